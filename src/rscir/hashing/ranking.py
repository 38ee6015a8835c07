"""Hamming ranking over packed codes: FAISS binary indexes, exact float re-ranking, and
composed (image + text) queries fused as WeiCom does.

* :class:`HammingIndex` wraps ``faiss.IndexBinaryFlat`` (exhaustive, exact),
  ``IndexBinaryMultiHash`` (multi-index hashing: the code is split into ``nhash`` substrings,
  each a hash table probed with up to ``nflip`` flipped bits — sub-linear, approximate) or
  ``IndexBinaryHNSW`` (graph search over codes, approximate). Results are returned with ties
  in canonical order (distance, then row); the flat index equals the brute-force ranking with
  ties by lower row, boundary included (its scan keeps the first of equal distances).
* :func:`rerank` re-scores the Hamming candidates exactly with the float embeddings;
  :class:`HashSearch` puts hasher, index and re-ranking together behind ``add``/``search``.
* Composed queries: the text embedding is hashed with the same functions; Hamming similarities
  ``1 − H/n_bits`` of the image code and of the text code are standardized per query over the
  archive and mapped through Φ (:func:`rscir.scoring.fuse`). The per-query statistics come from
  the archive's *bit moments* (:class:`CodeMoments`): since ``H(q, x) = Σq + (1 − 2q)·x`` is
  affine in the bits ``x``, its mean and unbiased variance over the archive are exact in
  O(n_bits²) per query, so only candidates need scoring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.utils.validation import check_is_fitted

from ..errors import InvalidArgumentError
from ..moments import ArchiveMoments, Moments
from ..scoring import QueryStats, fuse, topk
from ..search.topk import candidate_similarities
from .base import (
    BaseHasher,
    check_codes,
    check_n_bits,
    code_words,
    hamming_distances,
    popcount_rows,
    unpack_bits,
)

INDEX_KINDS: tuple[str, ...] = ("flat", "mih", "hnsw")
NO_DISTANCE = np.iinfo(np.int32).max


def canonical_order(dist: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (distance, id), missing results (id −1) last."""
    d = np.where(ids >= 0, dist, NO_DISTANCE).astype(np.int64)
    key_id = np.where(ids >= 0, ids, np.iinfo(np.int64).max)
    order = np.lexsort((key_id, d), axis=1)
    return (
        np.take_along_axis(d, order, axis=1).astype(np.int32),
        np.take_along_axis(ids, order, axis=1).astype(np.int64),
    )


canonical_topk = topk  # the name rscir.hashing exported first; ties by lower row


def hamming_topk(q_codes: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference: distances and rows of the k nearest codes by popcount, ties by
    lower row."""
    d = hamming_distances(q_codes, codes)
    idx, neg = topk(-d.astype(np.int64), k)
    return (-neg).astype(np.int32), idx


class HammingIndex:
    """A FAISS binary index over packed codes (``add`` then ``search``, FAISS style).

    ``kind``: ``flat`` (exact), ``mih`` (multi-index hashing; ``nhash`` substrings of
    ``n_bits // nhash`` bits, ``nflip`` flipped bits probed per table), ``hnsw`` (``hnsw_m``
    links, ``ef_search`` beam)."""

    def __init__(
        self,
        n_bits: int,
        kind: str = "flat",
        *,
        nhash: int | None = None,
        nflip: int = 2,
        hnsw_m: int = 16,
        ef_search: int = 128,
    ) -> None:
        import faiss

        self.n_bits = check_n_bits(n_bits)
        if kind not in INDEX_KINDS:
            raise InvalidArgumentError(f"unknown index kind {kind!r}; choose from {', '.join(INDEX_KINDS)}")
        self.kind = kind
        self.index: Any  # a FAISS binary index of the kind asked for
        if kind == "flat":
            self.index = faiss.IndexBinaryFlat(self.n_bits)
        elif kind == "mih":
            nh = nhash if nhash is not None else max(1, self.n_bits // 16)
            if nh < 1 or self.n_bits % nh or self.n_bits // nh > 63:
                raise InvalidArgumentError(
                    f"nhash={nh} must divide n_bits={self.n_bits} into substrings of ≤ 63 bits"
                )
            self.index = faiss.IndexBinaryMultiHash(self.n_bits, nh, self.n_bits // nh)
            self.index.nflip = int(nflip)
        else:
            self.index = faiss.IndexBinaryHNSW(self.n_bits, int(hnsw_m))
            self.index.hnsw.efSearch = int(ef_search)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, codes: np.ndarray) -> HammingIndex:
        self.index.add(check_codes(codes, self.n_bits // 8))
        return self

    def search(self, q_codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distances (Q, k) int32 and rows (Q, k) int64, nearest first; −1 where fewer found."""
        q = check_codes(q_codes, self.n_bits // 8, name="query codes")
        if int(k) < 1:
            raise InvalidArgumentError(f"k must be at least 1, got {k}")
        if self.ntotal == 0:
            raise InvalidArgumentError("the index is empty: add() codes first")
        dist, ids = self.index.search(q, int(k))
        return canonical_order(dist, ids)


def rerank(
    embeddings: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k among candidate rows (−1 = none; cosine for the L2-normalized
    vectors rscir stores): rows (Q, k) and scores (Q, k),
    best first, ties by candidate position; missing results get row −1 and score −inf."""
    cand = np.atleast_2d(np.asarray(candidates, np.int64))
    q = np.atleast_2d(np.asarray(queries))
    if q.shape[0] != cand.shape[0]:
        raise InvalidArgumentError(f"{q.shape[0]} queries but {cand.shape[0]} candidate rows")
    if q.shape[1] != embeddings.shape[1]:
        raise InvalidArgumentError(f"queries have dim {q.shape[1]}, embeddings have {embeddings.shape[1]}")
    sims = np.where(cand >= 0, candidate_similarities(embeddings, cand, q), -np.inf)
    pos, vals = topk(sims, k)
    rows = np.take_along_axis(cand, pos, axis=1)
    return np.where(np.isfinite(vals), rows, -1), vals


class HashSearch:
    """A fitted hasher with a Hamming index over its codes and, for re-ranking, the float
    vectors: FAISS-style ``add`` / ``search`` on float vectors.

    With ``rerank_depth`` > 0 the ``max(k, rerank_depth)`` Hamming nearest neighbours are
    re-scored by exact inner product (cosine on normalized vectors); otherwise rows come in
    Hamming order with scores ``1 − H/n_bits``."""

    def __init__(
        self, hasher: BaseHasher, kind: str = "flat", *, rerank_depth: int = 0, **index_kw: Any
    ) -> None:
        check_is_fitted(hasher, "n_bits_")
        self.hasher = hasher
        self.index = HammingIndex(hasher.n_bits_, kind, **index_kw)
        self.rerank_depth = int(rerank_depth)
        self._vectors: list[np.ndarray] = []

    def add(self, X: np.ndarray) -> HashSearch:
        x = np.asarray(X, np.float32)
        self.index.add(self.hasher.transform(x))
        if self.rerank_depth > 0:
            self._vectors.append(x)
        return self

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows (Q, k) int64 (−1 where fewer found) and scores (Q, k), best first."""
        q = np.atleast_2d(np.asarray(queries, np.float32))
        qc = self.hasher.transform(q)
        if self.rerank_depth <= 0:
            dist, rows = self.index.search(qc, k)
            return rows, np.where(rows >= 0, 1.0 - dist / self.index.n_bits, -np.inf)
        if len(self._vectors) > 1:
            self._vectors = [np.concatenate(self._vectors)]
        _, cand = self.index.search(qc, max(int(k), self.rerank_depth))
        return rerank(self._vectors[0], q, cand, k)


@dataclass(frozen=True)
class CodeMoments:
    """Mean and covariance of the archive's code bits: exact per-query Hamming statistics."""

    n_bits: int
    moments: ArchiveMoments

    @classmethod
    def of(cls, codes: np.ndarray, chunk: int = 1 << 16) -> CodeMoments:
        c = check_codes(codes)
        n_bits = c.shape[1] * 8
        sums = sum(
            (Moments.of(unpack_bits(c[i : i + chunk])) for i in range(0, c.shape[0], chunk)),
            Moments.zeros(n_bits),
        )
        return cls(n_bits, ArchiveMoments.from_sums(sums))

    def query_stats(self, q_codes: np.ndarray) -> QueryStats:
        """Per-query mean and unbiased std of the similarity ``1 − H/n_bits`` over the archive."""
        q = unpack_bits(check_codes(q_codes, self.n_bits // 8, name="query codes"))
        qf = q.astype(np.float64)
        st = self.moments.query_stats(1.0 - 2.0 * qf)  # stats of (1 − 2q)·x
        mean_h = qf.sum(axis=1, keepdims=True) + st.mean
        return QueryStats(mean=1.0 - mean_h / self.n_bits, std=st.std / self.n_bits)


def hamming_similarity(
    q_codes: np.ndarray, codes: np.ndarray, rows: np.ndarray | None = None
) -> np.ndarray:
    """``1 − H/n_bits`` in float64: against the whole archive (Q, N), or against candidate
    ``rows`` (Q, C) of each query (−1 -> NaN)."""
    q = check_codes(q_codes, name="query codes")
    c = check_codes(codes, q.shape[1], name="archive codes")
    n_bits = 8 * q.shape[1]
    if rows is None:
        return 1.0 - hamming_distances(q, c) / n_bits
    r = np.atleast_2d(np.asarray(rows, np.int64))
    gathered = code_words(c[np.where(r >= 0, r, 0)])  # (Q, C, w)
    d = popcount_rows(gathered ^ code_words(q)[:, None, :])
    return np.where(r >= 0, 1.0 - d / n_bits, np.nan)


def composed_hamming_scores(
    img_codes: np.ndarray | None,
    txt_codes: np.ndarray | None,
    codes: np.ndarray,
    *,
    method: str = "weicom",
    lam: float = 0.5,
    moments: CodeMoments | None = None,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Fused scores of a composed query over codes: Hamming similarities of the image code and
    of the (same-function) text code, fused by :func:`rscir.scoring.fuse`.

    Without ``rows`` every archive item is scored (Q, N) and WeiCom's statistics come from that
    scan (or from ``moments`` if given); with ``rows`` (Q, C) only those candidates are scored
    and ``moments`` supplies the exact archive statistics (required for WeiCom)."""
    if rows is not None and method == "weicom" and moments is None:
        raise InvalidArgumentError("scoring candidate rows with WeiCom needs the archive's CodeMoments")
    si = None if img_codes is None else hamming_similarity(img_codes, codes, rows)
    st = None if txt_codes is None else hamming_similarity(txt_codes, codes, rows)
    kw: dict[str, Any] = {}
    if moments is not None and method == "weicom":
        if img_codes is not None:
            kw["img_stats"] = moments.query_stats(img_codes)
        if txt_codes is not None:
            kw["txt_stats"] = moments.query_stats(txt_codes)
    out = np.asarray(fuse(method, si, st, lam, **kw), np.float64)
    return out if rows is None else np.where(np.asarray(rows) >= 0, out, -np.inf)


def composed_hamming_search(
    img_codes: np.ndarray | None,
    txt_codes: np.ndarray | None,
    codes: np.ndarray,
    k: int,
    *,
    method: str = "weicom",
    lam: float = 0.5,
    moments: CodeMoments | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows (Q, k) and fused scores of a composed query over the whole archive (equal
    scores by lower row)."""
    scores = composed_hamming_scores(
        img_codes, txt_codes, codes, method=method, lam=lam, moments=moments
    )
    return topk(scores, k)
