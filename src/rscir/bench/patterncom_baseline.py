"""The previous PatternCom evaluation (before the ragged-rank rewrite), kept verbatim.

It is the in-run baseline of ``benchmarks/patterncom_speed.py`` and the oracle that
``tests/bench/test_patterncom_fast.py`` checks :func:`rscir.bench.patterncom.evaluate_pairs`
against (every per-pair AP, P@k and R@k must be equal): sorted score rows, relevant items padded
to the longest relevance list of the attribute and located with a batched ``torch.searchsorted``.
Pass :func:`evaluate_pairs` as ``run_patterncom(..., evaluator=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from ..errors import InvalidArgumentError
from ..moments import ArchiveMoments
from ..scoring import fuse
from .metrics import average_precision_from_ranks, precision_recall_at_k, relevant_ranks
from .patterncom import (
    DEFAULT_MEMORY_CAP,
    KS,
    Config,
    PairMetrics,
    Pairs,
    as_float32,
    normalize_cdf,
    weicom_from_normalized,
)


@dataclass
class _TextSims:
    """Similarities of every text to the database, raw and WeiCom-normalized, with sorted rows."""

    raw: np.ndarray
    norm: np.ndarray | None
    _sorted: dict[str, np.ndarray] = field(default_factory=dict)

    def sorted(self, which: str) -> np.ndarray:
        if which not in self._sorted:
            m = self.raw if which == "raw" else self.norm
            assert m is not None  # normalized rows exist when WeiCom asked for them
            self._sorted[which] = np.sort(m, axis=1)
        return self._sorted[which]


def evaluate_pairs(
    db: np.ndarray,
    text_feats: np.ndarray,
    pairs: Pairs,
    configs: Sequence[Config],
    *,
    ks: Sequence[int] = KS,
    memory_cap: int = DEFAULT_MEMORY_CAP,
    block: int = 128,
    workers: int = 1,
    moments: ArchiveMoments | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[Config, PairMetrics]:
    """Metrics of every pair for every configuration. ``text_feats`` (len(pairs.texts), d).

    Pairs are grouped by query image into chunks whose similarity matrices fit ``memory_cap``
    (shared by ``workers`` threads: numpy's sort, BLAS and torch release the GIL), and scored in
    blocks of ``block`` pairs."""
    db = as_float32(db)
    n = db.shape[0]
    if n < 2:
        raise InvalidArgumentError("the database needs at least 2 images")
    text_feats = as_float32(text_feats)
    if text_feats.shape != (len(pairs.texts), db.shape[1]):
        raise InvalidArgumentError(
            f"text features have shape {text_feats.shape}, expected "
            f"{(len(pairs.texts), db.shape[1])}"
        )
    n_pairs = len(pairs)
    out = {
        c: PairMetrics(np.zeros(n_pairs), np.zeros((n_pairs, len(ks))), np.zeros((n_pairs, len(ks))))
        for c in configs
    }
    if n_pairs == 0:
        return out
    need_norm = any(c.method == "weicom" and c.lam not in (0.0, 1.0) for c in configs)
    if need_norm and moments is None:
        moments = ArchiveMoments.of(db)
    raw_t = text_feats @ db.T
    tsims = _TextSims(
        raw_t, normalize_cdf(raw_t, moments.query_stats(text_feats))
        if need_norm and moments is not None else None
    )
    if any(c.method == "text" or (c.method == "weicom" and c.lam == 1.0) for c in configs):
        tsims.sorted("raw")  # shared by all threads: sort before they start

    counts = np.array([len(r) for r in pairs.relevant], dtype=np.int64)
    m_max = int(counts.max()) if len(counts) else 0
    rel_cols = np.zeros((len(counts), m_max), np.int64)
    for g, r in enumerate(pairs.relevant):
        rel_cols[g, : len(r)] = r
    rel_valid = np.arange(m_max)[None, :] < counts[:, None]

    # Chunks of whole queries: per chunk ~4 float32 (pairs × N) matrices (raw, normalized and
    # sorted image similarities, plus a block's fused scores).
    workers = max(1, int(workers))
    order = np.argsort(pairs.query, kind="stable")
    q_sorted = pairs.query[order]
    max_pairs = max(1, int(memory_cap // workers // (4 * 4 * n)) - block)
    starts = np.flatnonzero(np.r_[True, q_sorted[1:] != q_sorted[:-1]])
    bounds = [0]
    for s in starts[1:]:
        if s - bounds[-1] >= max_pairs:
            bounds.append(int(s))
    bounds.append(n_pairs)

    def run_chunk(lo: int, hi: int) -> None:
        idx_chunk = order[lo:hi]
        uq, qi_chunk = np.unique(pairs.query[idx_chunk], return_inverse=True)
        s_img = db[uq] @ db.T
        n_img = (normalize_cdf(s_img, moments.query_stats(db[uq]))
                 if need_norm and moments is not None else None)
        img_sorted: dict[str, np.ndarray] = {}
        for b in range(0, hi - lo, block):
            sl = slice(b, min(b + block, hi - lo))
            idx, qi, ti = idx_chunk[sl], qi_chunk[sl], pairs.text[idx_chunk[sl]]
            gi = pairs.group[idx]
            cols, valid, n_rel = rel_cols[gi], rel_valid[gi], counts[gi]
            rows: dict[str, np.ndarray] = {}  # this block's gathered similarity rows
            for c in configs:
                ranks = _config_ranks(c, s_img, n_img, img_sorted, rows, tsims, qi, ti, cols,
                                      valid)
                ap = average_precision_from_ranks(ranks, n_rel)
                prec, rec = precision_recall_at_k(ranks, n_rel, ks)
                m = out[c]
                m.ap[idx] = np.round(ap * 100, 2)
                m.precision[idx] = np.round(prec * 100, 2)
                m.recall[idx] = np.round(rec * 100, 2)
            if progress is not None:
                progress(len(idx))

    spans = list(zip(bounds[:-1], bounds[1:], strict=True))
    if workers == 1 or len(spans) == 1:
        for lo, hi in spans:
            run_chunk(lo, hi)
    else:
        # One BLAS/OpenMP thread per worker: the workers already use every core.
        with threadpool_limits(limits=1), ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(run_chunk, lo, hi) for lo, hi in spans]:
                f.result()
    return out


def _config_ranks(
    c: Config,
    s_img: np.ndarray,
    n_img: np.ndarray | None,
    img_sorted: dict[str, np.ndarray],
    rows: dict[str, np.ndarray],
    tsims: _TextSims,
    qi: np.ndarray,
    ti: np.ndarray,
    cols: np.ndarray,
    valid: np.ndarray,
) -> np.ndarray:
    """Ranks of the relevant items of a block of pairs under one configuration. Rankings that do
    not depend on the text (image, WeiCom λ=0) or the image (text, WeiCom λ=1) are sorted once
    per query image or text and shared by all their pairs; WeiCom at λ = 0/1 ranks exactly as the
    raw similarities (Φ and the per-query standardization are strictly increasing). ``rows``
    caches the block's gathered similarity rows across configurations (e.g. a λ sweep)."""
    lam = c.lam if c.lam is not None else 0.5
    if c.method == "image" or (c.method == "weicom" and lam == 0.0):
        if "raw" not in img_sorted:
            img_sorted["raw"] = np.sort(s_img, axis=1)
        return relevant_ranks(s_img, cols, valid, rows=qi, sorted_scores=img_sorted["raw"])
    if c.method == "text" or (c.method == "weicom" and lam == 1.0):
        return relevant_ranks(tsims.raw, cols, valid, rows=ti, sorted_scores=tsims.sorted("raw"))
    kinds = ("ni", "nt") if c.method == "weicom" else ("si", "st")
    for kind in kinds:
        if kind not in rows:
            src = {"ni": n_img, "nt": tsims.norm, "si": s_img, "st": tsims.raw}[kind]
            assert src is not None  # the sides this method uses were computed
            rows[kind] = src[qi if kind[1] == "i" else ti]
    if c.method == "weicom":
        fused = weicom_from_normalized(rows["ni"], rows["nt"], lam)
    else:
        fused = fuse(c.method, rows["si"], rows["st"], lam)
    return relevant_ranks(fused, cols, valid)
