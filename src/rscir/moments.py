"""Exact WeiCom normalization from archive moments, without scanning the archive.

For a query vector ``q`` and archive embeddings ``x_1..x_n``, the similarities ``s_i = q·x_i``
have mean ``q·μ`` and unbiased variance ``qᵀΣq``, where ``μ`` and ``Σ`` are the archive's mean
and unbiased covariance. The store keeps ``n``, ``Σx`` and ``Σxxᵀ`` in float64 (per segment,
summed on load), so the per-query statistics cost O(d²) whatever the archive size and equal
the full-scan values up to float64 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError
from .scoring.fusion import QueryStats


@dataclass(frozen=True)
class Moments:
    """Sums over live items (as stored, in float64): count, Σx and Σxxᵀ.

    They give the exact per-query mean and unbiased variance of ``q·x`` over the archive in
    O(d²) (see :class:`ArchiveMoments`), and merge by addition across segments or shards.
    """

    n: int
    sum: np.ndarray
    sumsq: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, chunk: int = 8192) -> Moments:
        """Sums of ``x`` (N, d), converted to float64 a chunk of rows at a time (a million-row
        float16 segment would otherwise need an 8× float64 copy)."""
        x = np.asarray(x)
        d = x.shape[1]
        s, ss = np.zeros(d), np.zeros((d, d))
        for i in range(0, x.shape[0], chunk):
            c = np.asarray(x[i : i + chunk], dtype=np.float64)
            s += c.sum(axis=0)
            ss += c.T @ c
        return cls(int(x.shape[0]), s, ss)

    @classmethod
    def zeros(cls, dim: int) -> Moments:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.n + other.n, self.sum + other.sum, self.sumsq + other.sumsq)

    def __sub__(self, other: Moments) -> Moments:
        return Moments(self.n - other.n, self.sum - other.sum, self.sumsq - other.sumsq)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.n, 1)

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance Σ = (Σxxᵀ − n μμᵀ) / (n − 1)."""
        return ArchiveMoments.from_sums(self).cov


@dataclass(frozen=True)
class ArchiveMoments:
    """Archive mean ``μ`` (d,) and unbiased covariance ``Σ`` (d, d), float64."""

    n: int
    mean: np.ndarray
    cov: np.ndarray

    @classmethod
    def from_sums(cls, m: Moments) -> ArchiveMoments:
        n = int(m.n)
        if n < 2:
            raise InvalidArgumentError("WeiCom normalization needs an archive of at least 2 items")
        s = np.asarray(m.sum, np.float64)
        ss = np.asarray(m.sumsq, np.float64)
        if s.ndim != 1 or ss.shape != (s.shape[0], s.shape[0]):
            raise InvalidArgumentError(f"moment shapes do not match: sum {s.shape}, sumsq {ss.shape}")
        mu = s / n
        # (Σxxᵀ − n μμᵀ)/(n−1); symmetrized so qᵀΣq sees no rounding asymmetry
        cov = (ss - n * np.outer(mu, mu)) / (n - 1)
        cov = (cov + cov.T) / 2
        return cls(n=n, mean=mu, cov=cov)

    @classmethod
    def of(cls, x: np.ndarray, chunk: int = 8192) -> ArchiveMoments:
        """Moments of an embedding matrix (float64 accumulation, chunked for memmaps)."""
        return cls.from_sums(Moments.of(x, chunk))

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def query_stats(self, queries: np.ndarray) -> QueryStats:
        """Exact per-query mean and unbiased std of ``q·x`` over the archive, shape (Q, 1)."""
        q = np.atleast_2d(np.asarray(queries, np.float64))
        if q.shape[1] != self.dim:
            raise InvalidArgumentError(f"queries have dim {q.shape[1]}, archive moments have {self.dim}")
        mean = q @ self.mean
        var = ((q @ self.cov) * q).sum(axis=1)  # qᵀΣq per query, as one matrix product
        std = np.sqrt(np.maximum(var, 0.0))  # tiny negative values are rounding of a 0 variance
        return QueryStats(mean=mean[:, None], std=std[:, None])


def query_stats(queries: np.ndarray, moments: Moments | ArchiveMoments) -> QueryStats:
    """:class:`QueryStats` for a batch of queries from ``store.moments()`` (or precomputed)."""
    am = moments if isinstance(moments, ArchiveMoments) else ArchiveMoments.from_sums(moments)
    return am.query_stats(queries)
