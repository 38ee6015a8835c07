"""Exact scoring of any registered method over a whole archive, in row chunks.

Three steps, usable separately (a λ sweep prepares and scans once, then fuses per λ):

1. :func:`prepare_queries` — the transformed query vectors ``q'_img``, ``q'_txt`` (centring,
   contrastive-PCA projection, query expansion; :mod:`rscir.scoring.methods`), the per-query
   offsets that make the *used* similarities ``q'·x − offset`` (= ``q'·(x − μ)`` when centred),
   and the statistics of ``q'·x`` over the archive from its moments (exact, O(d²) a query).
2. :func:`archive_similarities` — the used similarities ``(Q, N)`` in float64, reading the
   archive (e.g. a read-only float16 ``np.memmap``) a chunk of rows at a time: no float64 copy
   of the archive is ever held.
3. :func:`fuse_prepared` — the method's fusion over full rows: WeiCom's normalization from the
   moments, min-max from the rows themselves, always over the *whole* archive.

:func:`score_exact` runs all three. A caller that keeps a filtered subset slices the returned
``(Q, N)`` matrices afterwards, so no normalization ever sees a subset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, QueryError
from .basis import TextBasis, TextEncoder, text_basis
from .fusion import QueryStats, check_lam, combine, topk
from .methods import FusionOptions, MethodSpec, method_spec

DEFAULT_CHUNK = 8192  # archive rows converted to float64 at once (8192 × 768 × 8 B = 48 MiB)
NeighbourFn = Callable[[np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class PreparedQueries:
    """Transformed queries of one method (see the module docstring).

    ``img``/``txt`` (Q, d) float64 or None; the used similarity is ``img·x − img_offset``
    (offset (Q, 1)); ``img_stats``/``txt_stats`` are the mean and unbiased std of ``img·x``
    over the archive (what the TA/ANN strategies take with the prepared vectors);
    ``neighbours`` (Q, qe_k) the archive rows query expansion used (-1: none)."""

    spec: MethodSpec
    img: np.ndarray | None
    txt: np.ndarray | None
    img_offset: np.ndarray | None
    txt_offset: np.ndarray | None
    img_stats: QueryStats | None
    txt_stats: QueryStats | None
    neighbours: np.ndarray | None = None

    @property
    def n_queries(self) -> int:
        v = self.img if self.img is not None else self.txt
        return 0 if v is None else int(v.shape[0])

    def used_stats(self, which: str) -> QueryStats | None:
        """Statistics of the *used* similarity (``q'·x − offset``) of ``"img"``/``"txt"``."""
        st = self.img_stats if which == "img" else self.txt_stats
        off = self.img_offset if which == "img" else self.txt_offset
        if st is None:
            return None
        return QueryStats(mean=st.mean - off, std=st.std)


@dataclass(frozen=True)
class ExactScores:
    """Fused scores (Q, N) and the used image/text similarities (Q, N) (None when unused)."""

    scores: np.ndarray
    sim_img: np.ndarray | None
    sim_txt: np.ndarray | None
    prepared: PreparedQueries


def _as_queries(v: np.ndarray | None, dim: int, what: str) -> np.ndarray | None:
    if v is None:
        return None
    q = np.atleast_2d(np.asarray(v, np.float64))
    if q.ndim != 2 or q.shape[1] != dim:
        raise InvalidArgumentError(f"{what} queries have shape {q.shape}, the archive dim {dim}")
    return q


def _archive_moments(moments: object) -> Any:
    """ArchiveMoments of ``moments`` (imported here: importing rscir.moments runs this package's
    ``__init__`` first, which imports this module)."""
    from ..moments import ArchiveMoments, Moments

    if isinstance(moments, ArchiveMoments):
        return moments
    if isinstance(moments, Moments):
        return ArchiveMoments.from_sums(moments)
    raise InvalidArgumentError(
        f"moments must be rscir.moments.Moments or ArchiveMoments, got {type(moments).__name__}"
    )


def exact_neighbours(
    embeddings: np.ndarray, queries: np.ndarray, k: int, *, chunk: int = DEFAULT_CHUNK
) -> np.ndarray:
    """Rows (Q, k) of the k largest inner products ``q·x`` per query, best first, ties by lower
    row (as :func:`rscir.scoring.topk`); a running top-k over row chunks."""
    q = np.asarray(queries, np.float64)
    n = int(embeddings.shape[0])
    k = max(0, min(int(k), n))
    best_v = np.empty((q.shape[0], 0))
    best_r = np.empty((q.shape[0], 0), np.int64)
    for lo in range(0, n, chunk):
        x = np.asarray(embeddings[lo : lo + chunk], np.float64)
        s = q @ x.T
        vals = np.concatenate([best_v, s], axis=1)
        rows = np.concatenate(
            [best_r, np.broadcast_to(np.arange(lo, lo + len(x)), s.shape)], axis=1
        )
        # columns: previous best (rows < lo, sorted by value then row) then this chunk in row
        # order, so "lower column on ties" is "lower row on ties"
        idx, best_v = topk(vals, k)
        best_r = np.take_along_axis(rows, idx, axis=1)
    return best_r


def _expand(
    embeddings: np.ndarray,
    base: np.ndarray,
    probe: np.ndarray,
    mu: np.ndarray | None,
    rows: np.ndarray,
    beta: float,
) -> np.ndarray:
    """``Σ w_j (x_j − μ) + w_0·base`` with ``w ∝ exp(β·s)``, ``s_j = probe·(x_j − μ)`` and
    ``s_0 = 1`` for the query itself (BASIC); padded rows (-1) get no weight."""
    q, k = rows.shape
    valid = rows >= 0
    flat = np.where(valid, rows, 0).ravel()
    order = np.argsort(flat, kind="stable")  # sorted reads for memory-mapped archives
    flat_x = np.empty((flat.size, base.shape[1]))
    flat_x[order] = np.asarray(embeddings[flat[order]], np.float64)
    x = flat_x.reshape(q, k, -1)
    if mu is not None:
        x -= mu
    s = np.einsum("qkd,qd->qk", x, probe)
    s = np.concatenate([s, np.ones((q, 1))], axis=1)
    logits = np.where(np.concatenate([valid, np.ones((q, 1), bool)], axis=1), beta * s, -np.inf)
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("qk,qkd->qd", w[:, :k], x) + w[:, k:] * base


def prepare_queries(
    method: str | MethodSpec,
    img: np.ndarray | None,
    txt: np.ndarray | None,
    moments: object,
    *,
    options: FusionOptions | None = None,
    basis: TextBasis | None = None,
    encode_texts: TextEncoder | None = None,
    embeddings: np.ndarray | None = None,
    neighbours: NeighbourFn | None = None,
    chunk: int = DEFAULT_CHUNK,
    paired: bool = True,
) -> PreparedQueries:
    """Transformed query vectors, offsets and archive statistics of a method.

    ``paired=False`` prepares image and text queries independently (different counts, either
    may be None), for benchmarks that combine every image with several texts.

    ``moments``: :class:`rscir.moments.Moments` or ``ArchiveMoments`` of the whole archive.
    ``basis`` (or ``encode_texts`` to compute it) is needed for ``tcentre``/``project``.
    Query expansion needs ``embeddings`` (the stored rows; a memmap is fine) and finds the
    neighbours with ``neighbours(q (Q, d) float64, k) -> rows (Q, k)`` by inner product
    (default: :func:`exact_neighbours`; an ANN search fits, -1 pads missing rows)."""
    spec = method_spec(method)
    opts = options or FusionOptions()
    am = _archive_moments(moments)
    mu = am.mean if spec.centre else None
    qi = _as_queries(img, am.dim, "image") if spec.needs_image else None
    qt = _as_queries(txt, am.dim, "text") if spec.needs_text else None
    if paired and spec.needs_image and qi is None:
        raise QueryError(f"method {spec.name!r} needs a query image")
    if paired and spec.needs_text and qt is None:
        raise QueryError(f"method {spec.name!r} needs a query text")
    if paired and qi is not None and qt is not None and len(qi) != len(qt):
        raise InvalidArgumentError(f"{len(qi)} image queries but {len(qt)} text queries")
    if (spec.project and qi is not None or spec.tcentre and qt is not None) and basis is None:
        if encode_texts is None:
            raise InvalidArgumentError(
                f"method {spec.name!r} needs the text encoder (encode_texts=) or a TextBasis "
                "for its word lists"
            )
        basis = text_basis(encode_texts, opts.objects, opts.styles if spec.project else None,
                           alpha=opts.alpha, n_components=opts.n_components)
    if spec.project and (basis is None or basis.components is None):
        raise InvalidArgumentError("projection needs a TextBasis built with a style list")
    if spec.tcentre and qt is not None and basis is None:
        raise InvalidArgumentError("text centring needs a TextBasis")
    if basis is not None and basis.dim != am.dim:
        raise InvalidArgumentError(f"text basis has dim {basis.dim}, the archive {am.dim}")

    nb_rows = None
    if qi is not None:
        base = qi - mu if mu is not None else qi
        probe = basis.project(base) if spec.project and basis is not None else base
        if spec.qe:
            if embeddings is None:
                raise InvalidArgumentError("query expansion needs the archive embeddings")
            k = min(opts.qe_k, int(embeddings.shape[0]))
            find = neighbours or (lambda q, kk: exact_neighbours(embeddings, q, kk, chunk=chunk))
            nb_rows = np.asarray(find(probe, k), np.int64).reshape(len(probe), -1)
            if nb_rows.size and nb_rows.max() >= embeddings.shape[0]:
                raise InvalidArgumentError("the neighbour search returned rows past the archive")
            expanded = _expand(embeddings, base, probe, mu, nb_rows, opts.qe_beta)
            qi = basis.project(expanded) if spec.project and basis is not None else expanded
        else:
            qi = probe
    if qt is not None and spec.tcentre and basis is not None:
        qt = qt - basis.text_mean

    def offset(q: np.ndarray | None) -> np.ndarray | None:
        if q is None:
            return None
        return (q @ mu)[:, None] if mu is not None else np.zeros((len(q), 1))

    return PreparedQueries(
        spec=spec, img=qi, txt=qt, img_offset=offset(qi), txt_offset=offset(qt),
        img_stats=None if qi is None else am.query_stats(qi),
        txt_stats=None if qt is None else am.query_stats(qt),
        neighbours=nb_rows,
    )


def archive_similarities(
    prepared: PreparedQueries, embeddings: np.ndarray, *, chunk: int = DEFAULT_CHUNK
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The used image and text similarities (Q, N) float64 over every archive row."""
    n = int(embeddings.shape[0])
    vecs = [v for v in (prepared.img, prepared.txt) if v is not None]
    if not vecs:
        return None, None
    q = np.concatenate(vecs, axis=0)
    out = np.empty((q.shape[0], n))
    for lo in range(0, n, chunk):
        x = np.asarray(embeddings[lo : lo + chunk], np.float64)
        out[:, lo : lo + len(x)] = q @ x.T
    si = st = None
    nq = 0
    if prepared.img is not None and prepared.img_offset is not None:
        nq = len(prepared.img)
        si = out[:nq]
        si -= prepared.img_offset
    if prepared.txt is not None and prepared.txt_offset is not None:
        st = out[nq:]
        st -= prepared.txt_offset
    return si, st


def fuse_prepared(
    prepared: PreparedQueries,
    sim_img: np.ndarray | None,
    sim_txt: np.ndarray | None,
    lam: float = 0.5,
    *,
    options: FusionOptions | None = None,
) -> np.ndarray:
    """The method's fused scores from full-archive used similarities (Q, N)."""
    opts = options or FusionOptions()
    return combine(
        prepared.spec.fusion, sim_img, sim_txt, check_lam(lam),
        img_stats=prepared.used_stats("img"), txt_stats=prepared.used_stats("txt"),
        harris_h=opts.harris_h,
    )


def score_exact(
    method: str | MethodSpec,
    img: np.ndarray | None,
    txt: np.ndarray | None,
    embeddings: np.ndarray,
    moments: object,
    lam: float = 0.5,
    *,
    options: FusionOptions | None = None,
    basis: TextBasis | None = None,
    encode_texts: TextEncoder | None = None,
    neighbours: NeighbourFn | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> ExactScores:
    """Fused scores of any method over the whole archive (exact scan).

    ``img``/``txt``: (Q, d) or (d,) query vectors (L2-normalized, as the encoders return);
    ``embeddings``: (N, d), any float dtype, read in chunks; ``moments``: the archive's
    :class:`~rscir.moments.Moments` (``store.moments()``). See :func:`prepare_queries` for the
    rest. Returns the scores and the used similarities, each (Q, N)."""
    lam = check_lam(lam)
    prep = prepare_queries(
        method, img, txt, moments, options=options, basis=basis, encode_texts=encode_texts,
        embeddings=embeddings, neighbours=neighbours, chunk=chunk,
    )
    si, st = archive_similarities(prep, embeddings, chunk=chunk)
    scores = fuse_prepared(prep, si, st, lam, options=options)
    return ExactScores(np.asarray(scores), si, st, prep)
