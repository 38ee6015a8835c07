"""Composed top-k without scoring the whole archive: the threshold algorithm over sorted streams.

Fagin's threshold algorithm (TA) for a fusion ``f(a, b)`` of image similarity ``a = q_img·x`` and
text similarity ``b = q_txt·x``: read the image-similarity and text-similarity neighbours of the
query to depth ``D`` (sorted streams, from an exact scan or an ANN index), score every item seen
exactly, and stop once the k-th best exact score is at least the threshold ``τ = f(a_D, b_D)``,
where ``a_D``/``b_D`` are the similarities at depth ``D``. An item seen in neither stream has
``a ≤ a_D`` and ``b ≤ b_D``; when ``f`` is non-decreasing in both arguments it cannot beat
``τ``, so with exact streams the answer equals brute force. Otherwise the depth doubles.

* ``image``, ``text``, ``average``, ``sum`` and ``weicom`` (``λ·Φ(z_t) + (1−λ)·Φ(z_i)`` with
  the exact per-query archive statistics from :mod:`rscir.moments`) are monotone.
* ``product`` is not monotone when similarities can be negative (two negative similarities
  give a large product). It reads two more streams, the *least* similar items (a search with
  ``−q``), so an unseen item lies in the box ``[a_lo, a_hi] × [b_lo, b_hi]``; a bilinear
  function is maximized at a corner of a box, so ``τ = max`` of the four corner products.

A third stream, the neighbours of a combined vector (``(1−λ)q_img/σ_img + λq_txt/σ_txt`` for
WeiCom, ``q_img + q_txt`` for sum/average), only adds candidates: it does not enter the bound,
so exactness is kept, but it raises the k-th best score early and lets TA stop sooner.

Every returned score is recomputed exactly (float64 dot products with the stored embeddings),
whatever the source; with ANN streams the result is approximate only in *which* items are seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import InvalidArgumentError, QueryError
from ..scoring import NEEDS_IMAGE, NEEDS_TEXT, QueryStats, check_lam, check_method, fuse, topk


class NeighborSource(Protocol):
    """A sorted stream of archive rows by decreasing inner product with a query."""

    @property
    def ntotal(self) -> int: ...

    def search(self, queries: np.ndarray, depth: int,
               allowed: np.ndarray | None = None) -> np.ndarray:
        """Rows (Q, depth) int64 of the ``depth`` most similar items per query, best first;
        ``-1`` pads when fewer are found. With ``allowed`` (N,) bool, only allowed rows (a
        filtered stream: its depth similarity then bounds the unseen *allowed* items)."""
        ...


def chunked_similarities(
    x: np.ndarray, q: np.ndarray, chunk_rows: int = 1 << 16, rows: np.ndarray | None = None
) -> np.ndarray:
    """Inner products (Q, N) float32 of queries ``q`` with every row of ``x`` (or the given
    sorted ``rows``), converting a chunk of rows at a time (float16 memmaps stay on disk)."""
    q = np.atleast_2d(np.asarray(q, dtype=np.float32))
    n = x.shape[0] if rows is None else len(rows)
    out = np.empty((q.shape[0], n), np.float32)
    for s in range(0, n, chunk_rows):
        block = x[s : s + chunk_rows] if rows is None else x[rows[s : s + chunk_rows]]
        out[:, s : s + block.shape[0]] = q @ np.asarray(block, np.float32).T
    return out


class ExactSource:
    """Brute-force stream: the exact top-``depth`` by inner product (chunked over the archive).

    TA asks the same queries again at doubled depth; the last similarity matrix is kept (keyed
    by the query bytes) so a deeper read costs a top-k, not another scan. Only the last one can
    be asked again (each round reads all streams at once), and each is (Q, N) float32."""

    def __init__(self, embeddings: np.ndarray, chunk_rows: int = 1 << 16, cache: int = 1) -> None:
        self.embeddings = embeddings
        self.chunk_rows = chunk_rows
        self._cache: dict[bytes, np.ndarray] = {}
        self._cache_size = cache

    @property
    def ntotal(self) -> int:
        return int(self.embeddings.shape[0])

    def similarities(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        key = q.shape[0].to_bytes(4, "little") + q.tobytes()
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        sims = chunked_similarities(self.embeddings, q, self.chunk_rows)
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = sims
        return sims

    def search(self, queries: np.ndarray, depth: int,
               allowed: np.ndarray | None = None) -> np.ndarray:
        depth = min(int(depth), self.ntotal)
        sims = self.similarities(queries)
        if allowed is None:
            return topk(sims, depth)[0]
        rows, vals = topk(np.where(allowed, sims, -np.inf), depth)
        return np.where(np.isfinite(vals), rows, -1)


@dataclass(frozen=True)
class TopKResult:
    """Top-k rows and exact scores per query, and how deep the streams were read."""

    rows: np.ndarray  # (Q, k) int64, -1 where fewer than k items exist
    scores: np.ndarray  # (Q, k) float64, -inf padding
    depth: np.ndarray  # (Q,) stream depth at which each query stopped
    candidates: np.ndarray  # (Q,) distinct items scored exactly in the last round
    certified: np.ndarray  # (Q,) True where the TA bound proved the answer (exact streams)


def candidate_similarities(
    embeddings: np.ndarray, rows: np.ndarray, q: np.ndarray, max_elems: int = 1 << 24
) -> np.ndarray:
    """Exact float64 similarities (Q, C) of query ``q[i]`` with rows ``rows[i]`` (``-1`` -> 0).

    Gathers a chunk of queries at a time so memory stays ~``max_elems`` floats."""
    rows = np.atleast_2d(rows)
    qn, c = rows.shape
    out = np.zeros((qn, c), np.float64)
    if c == 0:
        return out
    d = q.shape[1]
    step = max(1, max_elems // max(1, c * d))
    safe = np.where(rows >= 0, rows, 0)
    for s in range(0, qn, step):
        r = safe[s : s + step]
        if r.shape[0] == 1:  # one query: one sorted gather, one matrix-vector product
            u, inv = np.unique(r[0], return_inverse=True)
            x = np.asarray(embeddings[u], np.float64)
            out[s] = (x @ np.asarray(q[s], np.float64))[inv]
        else:
            x = np.asarray(embeddings[r.ravel()], np.float64).reshape(*r.shape, d)
            out[s : s + step] = np.einsum("qcd,qd->qc", x, np.asarray(q[s : s + step], np.float64))
    return out


def exact_scores(
    embeddings: np.ndarray,
    rows: np.ndarray,
    img: np.ndarray | None,
    txt: np.ndarray | None,
    method: str,
    lam: float,
    img_stats: QueryStats | None,
    txt_stats: QueryStats | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Exact fused scores (Q, C) of candidate rows (``-1`` -> ``-inf``) and the similarities."""
    valid = rows >= 0
    si = st = None
    if img is not None and method in NEEDS_IMAGE:
        si = candidate_similarities(embeddings, rows, img)
    if txt is not None and method in NEEDS_TEXT:
        st = candidate_similarities(embeddings, rows, txt)
    f = np.asarray(fuse(method, si, st, lam, img_stats=img_stats, txt_stats=txt_stats), np.float64)
    return np.where(valid, f, -np.inf), si, st


def _stat_rows(st: QueryStats | None, sel: np.ndarray) -> QueryStats | None:
    return None if st is None else QueryStats(mean=st.mean[sel], std=st.std[sel])


def _streams_needed(method: str, lam: float) -> tuple[bool, bool]:
    use_img = method in NEEDS_IMAGE and not (method == "weicom" and lam == 1.0)
    use_txt = method in NEEDS_TEXT and not (method == "weicom" and lam == 0.0)
    return use_img, use_txt


def _safe_std(st: QueryStats) -> np.ndarray:
    return np.where(st.std > 0, st.std, 1.0)  # as in rscir.scoring.norm_cdf


def combined_weights(
    method: str, lam: float, img_stats: QueryStats | None, txt_stats: QueryStats | None, nq: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Weights ``(w_img, w_txt)`` (Q, 1) of the combined query ``w_img·q_img + w_txt·q_txt``.

    Its inner product ``w_img·a + w_txt·b`` *is* the fused score for sum (and twice it for
    average); for WeiCom it is the λ-weighted z-score sum ``(1−λ)z_img + λz_txt`` up to a
    per-query constant, the linearization of the fused score."""
    one = np.ones((nq, 1))
    if method in ("sum", "average"):
        return one, one
    if method == "weicom" and img_stats is not None and txt_stats is not None:
        return (1.0 - lam) / _safe_std(img_stats), lam / _safe_std(txt_stats)
    return None


def _weicom_line_bound(
    lam: float, zi: np.ndarray, zt: np.ndarray, line: np.ndarray, cells: int = 256
) -> np.ndarray:
    """Upper bound of ``λΦ(z_t) + (1−λ)Φ(z_i)`` over ``z_i ≤ zi, z_t ≤ zt,
    (1−λ)z_i + λz_t ≤ line`` (all (Q, 1)), for 0 < λ < 1.

    Φ is increasing, so the maximum lies on the part of the line inside the box (or at the box
    corner when that is feasible). Along the line ``z_t`` decreases as ``z_i`` grows; on a cell
    ``[u0, u1]`` of ``z_i`` the objective is at most ``(1−λ)Φ(u1) + λΦ(z_t(u0))``, so the
    maximum over cells is a rigorous bound (within a cell's width of the true maximum)."""
    from scipy.special import ndtr

    corner = lam * ndtr(zt) + (1 - lam) * ndtr(zi)
    feasible = (1 - lam) * zi + lam * zt <= line
    lo = (line - lam * zt) / (1 - lam)  # z_i where the line meets z_t = zt
    lo = np.minimum(lo, zi)
    # below z_i = -40 both Φ terms are 0 or the other term is already 1; clip for a finite grid
    lo = np.maximum(lo, np.minimum(zi, -40.0))
    u = lo + (zi - lo) * np.linspace(0.0, 1.0, cells + 1)[None, :]
    zt_line = np.minimum((line - (1 - lam) * u) / lam, zt)
    cell_ub = (1 - lam) * ndtr(u[:, 1:]) + lam * ndtr(zt_line[:, :-1])
    on_line = cell_ub.max(axis=1, keepdims=True)
    return np.where(feasible, corner, np.minimum(corner, on_line))


def _duplicates(rows: np.ndarray) -> np.ndarray:
    """Mask of entries repeating an earlier entry of the same row (each item scored once)."""
    order = np.argsort(rows, axis=1, kind="stable")
    r = np.take_along_axis(rows, order, axis=1)
    dup_sorted = np.zeros_like(r, dtype=bool)
    dup_sorted[:, 1:] = r[:, 1:] == r[:, :-1]
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    return dup


def composed_topk(
    embeddings: np.ndarray,
    img: np.ndarray | None,
    txt: np.ndarray | None,
    method: str = "weicom",
    lam: float = 0.5,
    k: int = 10,
    *,
    source: NeighborSource | None = None,
    img_stats: QueryStats | None = None,
    txt_stats: QueryStats | None = None,
    exclude_rows: Sequence[int | None] | None = None,
    allowed: np.ndarray | None = None,
    start_depth: int | None = None,
    max_depth: int | None = None,
    use_combined: bool = True,
) -> TopKResult:
    """Top-k of a composed query by TA over sorted streams, re-scored exactly.

    ``source`` defaults to :class:`ExactSource` over ``embeddings`` (then the result equals
    brute force). WeiCom needs the full-archive ``img_stats``/``txt_stats`` (see
    :func:`rscir.moments.query_stats`). ``max_depth`` caps the stream depth (ANN indexes);
    queries stopped by the cap rather than by the bound have ``certified == False``.
    ``allowed`` (N,) bool restricts the results (metadata filters) and is passed to the source,
    whose streams then hold allowed rows only (so a selective filter does not leave the capped
    streams nearly empty); the bound stays valid, since a filtered exact stream bounds every
    unseen allowed item. Fewer than k rows come back (padded with -1) when the cap is reached
    before k allowed items were seen.
    """
    check_method(method)
    lam = check_lam(lam)
    if method in NEEDS_IMAGE and img is None:
        raise QueryError(f"method {method!r} needs a query image; give one or pick a text-only method")
    if method in NEEDS_TEXT and txt is None:
        raise QueryError(f"method {method!r} needs a query text; give one or pick an image-only method")
    use_img, use_txt = _streams_needed(method, lam)
    if method == "weicom" and (
        (use_img and img_stats is None) or (use_txt and txt_stats is None)
    ):
        raise InvalidArgumentError("weicom top-k needs full-archive query statistics; pass img_stats/txt_stats from rscir.moments")
    qi = None if img is None else np.atleast_2d(np.asarray(img, np.float32))
    qt = None if txt is None else np.atleast_2d(np.asarray(txt, np.float32))
    nq = (qi if qi is not None else qt).shape[0]  # type: ignore[union-attr]
    if method == "weicom":  # at λ = 0 or 1 one side is unused: neutral stats keep fuse() cheap
        neutral = QueryStats(mean=np.zeros((nq, 1)), std=np.ones((nq, 1)))
        img_stats = img_stats if img_stats is not None else neutral
        txt_stats = txt_stats if txt_stats is not None else neutral
    src = source if source is not None else ExactSource(embeddings)
    n = src.ntotal
    if allowed is not None:
        allowed = np.asarray(allowed, bool)
        if allowed.shape != (n,):
            raise InvalidArgumentError(f"allowed must be a boolean mask of shape ({n},), got {allowed.shape}")
    k = int(k)
    if k < 1:
        raise InvalidArgumentError(f"k must be at least 1, got {k}")
    excl = np.full(nq, -1, np.int64)
    if exclude_rows is not None:
        excl[:] = [-1 if r is None else int(r) for r in exclude_rows]
    kk = k + 1  # one spare slot for an excluded query item
    cap = n if max_depth is None else max(1, min(int(max_depth), n))
    depth0 = min(cap, max(int(start_depth or 0), 2 * kk, 32))

    out_rows = np.full((nq, k), -1, np.int64)
    if n == 0:
        z = np.zeros(nq, np.int64)
        return TopKResult(out_rows, np.full((nq, k), -np.inf), z, z, np.ones(nq, bool))
    out_scores = np.full((nq, k), -np.inf)
    out_depth = np.zeros(nq, np.int64)
    out_cand = np.zeros(nq, np.int64)
    certified = np.zeros(nq, bool)
    weights = (
        combined_weights(method, lam, img_stats, txt_stats, nq)
        if use_combined and use_img and use_txt and qi is not None and qt is not None
        else None
    )
    comb = (
        None
        if weights is None
        else (weights[0] * qi + weights[1] * qt).astype(np.float32)
    )

    active = np.arange(nq)
    depth = depth0
    while active.size:
        a_qi = qi[active] if qi is not None else None
        a_qt = qt[active] if qt is not None else None
        a_is, a_ts = _stat_rows(img_stats, active), _stat_rows(txt_stats, active)
        wanted: list[tuple[str, np.ndarray]] = []
        for name, vecs, use in (("img", a_qi, use_img), ("txt", a_qt, use_txt)):
            if not use or vecs is None:
                continue
            wanted.append((name + "_hi", vecs))
            if method == "product":
                wanted.append((name + "_lo", -vecs))
        if comb is not None:
            wanted.append(("comb", comb[active]))
        # one search call for every stream: the source parallelizes over its queries
        qs = np.concatenate([v for _, v in wanted])
        found = src.search(qs, depth) if allowed is None else src.search(qs, depth, allowed)
        m = active.size
        streams = [(name, found[i * m : (i + 1) * m]) for i, (name, _) in enumerate(wanted)]
        cand = np.concatenate([r for _, r in streams], axis=1)
        sc, si, st = exact_scores(embeddings, cand, a_qi, a_qt, method, lam, a_is, a_ts)
        # each stream's exact similarity at its depth bounds every item it did not return
        bounds: dict[str, np.ndarray] = {}
        off = 0
        for name, r in streams:
            w = r.shape[1]
            if name == "comb":
                wi, wt = weights[0][active], weights[1][active]  # type: ignore[index]
                sims = wi * si[:, off : off + w] + wt * st[:, off : off + w]  # type: ignore[index]
            else:
                sims = (si if name.startswith("img") else st)[:, off : off + w]  # type: ignore[index]
            bounds[name] = _depth_value(sims, r >= 0, high=name != "img_lo" and name != "txt_lo")
            off += w
        drop = (cand == excl[active, None]) | _duplicates(cand)
        if allowed is not None:
            drop |= ~allowed[np.maximum(cand, 0)]
        sc = np.where(drop, -np.inf, sc)
        # order: score desc, then row asc (brute-force tie rule); -1 rows sort last
        order = np.lexsort((np.where(cand < 0, np.iinfo(np.int64).max, cand), -sc), axis=1)
        top_rows = np.take_along_axis(cand, order[:, :k], axis=1)
        top_sc = np.take_along_axis(sc, order[:, :k], axis=1)
        if top_rows.shape[1] < k:
            pad = k - top_rows.shape[1]
            top_rows = np.pad(top_rows, ((0, 0), (0, pad)), constant_values=-1)
            top_sc = np.pad(top_sc, ((0, 0), (0, pad)), constant_values=-np.inf)
        kth = top_sc[:, k - 1]
        tau = _threshold(method, lam, bounds, a_is, a_ts)
        everything = depth >= n
        # strict '>' so that an unseen item tied with the k-th score is still looked for
        done = everything | (kth > tau) | (depth >= cap)
        proven = everything | (kth > tau)
        fin = active[done]
        out_rows[fin] = np.where(np.isfinite(top_sc[done]), top_rows[done], -1)
        out_scores[fin] = top_sc[done]
        out_depth[fin] = depth
        out_cand[fin] = np.isfinite(sc[done]).sum(axis=1)
        certified[fin] = proven[done]
        active = active[~done]
        depth = min(cap, depth * 2)
    return TopKResult(out_rows, out_scores, out_depth, out_cand, certified)


def _depth_value(sims: np.ndarray, valid: np.ndarray, *, high: bool) -> np.ndarray:
    """Exact similarity at a stream's depth, (Q, 1): an upper (``high``) or lower bound on the
    similarity of every item the stream did not return (its worst returned similarity, which
    for an exact stream is the one at depth D). A stream that returned nothing bounds nothing."""
    if high:
        v = np.where(valid, sims, np.inf).min(axis=1)
        return np.where(np.isfinite(v), v, np.inf)[:, None]
    v = np.where(valid, sims, -np.inf).max(axis=1)
    return np.where(np.isfinite(v), v, -np.inf)[:, None]


def _threshold(
    method: str,
    lam: float,
    b: dict[str, np.ndarray],
    img_stats: QueryStats | None,
    txt_stats: QueryStats | None,
) -> np.ndarray:
    """Best fused score any unseen item can reach, per query."""
    if method == "product":
        corners = [
            b["img_hi"] * b["txt_hi"],
            b["img_lo"] * b["txt_lo"],
            b["img_hi"] * b["txt_lo"],
            b["img_lo"] * b["txt_hi"],
        ]
        return np.max(np.concatenate(corners, axis=1), axis=1)
    a = b.get("img_hi")
    t = b.get("txt_hi")
    ref = a if a is not None else t
    assert ref is not None
    if method == "weicom":
        # λ = 0 or 1 uses one stream; fuse() then ignores the other argument
        a = a if a is not None else np.zeros_like(ref)
        t = t if t is not None else np.zeros_like(ref)
    tau = np.asarray(fuse(method, a, t, lam, img_stats=img_stats, txt_stats=txt_stats), np.float64)
    c = b.get("comb")
    if c is not None and np.isfinite(c).any():
        if method == "sum":
            tau = np.minimum(tau, c)
        elif method == "average":
            tau = np.minimum(tau, c / 2)
        elif method == "weicom" and img_stats is not None and txt_stats is not None:
            # comb = (1−λ)a/σi + λb/σt = (1−λ)z_i + λz_t + (1−λ)μi/σi + λμt/σt
            si_, st_ = _safe_std(img_stats), _safe_std(txt_stats)
            zi = (a - img_stats.mean) / si_
            zt = (t - txt_stats.mean) / st_
            line = c - (1 - lam) * img_stats.mean / si_ - lam * txt_stats.mean / st_
            line = np.where(np.isfinite(c), line, np.inf)
            tau = np.minimum(tau, _weicom_line_bound(lam, zi, zt, line))
    return tau[:, 0]
