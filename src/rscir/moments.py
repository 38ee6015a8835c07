"""Exact WeiCom normalization from archive moments, without scanning the archive.

For a query vector ``q`` and archive embeddings ``x_1..x_n``, the similarities ``s_i = q·x_i``
have mean ``q·μ`` and unbiased variance ``qᵀΣq``, where ``μ`` and ``Σ`` are the archive's mean
and unbiased covariance. The store keeps ``n``, ``Σx`` and ``Σxxᵀ`` in float64 (per segment,
summed on load), so the per-query statistics cost O(d²) whatever the archive size and equal
the full-scan values up to float64 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .scoring import QueryStats


class MomentsLike(Protocol):
    """What :class:`rscir.store.Moments` offers: count, Σx (d,), Σxxᵀ (d, d)."""

    n: int
    sum: np.ndarray
    sumsq: np.ndarray


@dataclass(frozen=True)
class ArchiveMoments:
    """Archive mean ``μ`` (d,) and unbiased covariance ``Σ`` (d, d), float64."""

    n: int
    mean: np.ndarray
    cov: np.ndarray

    @classmethod
    def from_sums(cls, m: MomentsLike) -> ArchiveMoments:
        n = int(m.n)
        if n < 2:
            raise ValueError("WeiCom normalization needs an archive of at least 2 items")
        s = np.asarray(m.sum, np.float64)
        ss = np.asarray(m.sumsq, np.float64)
        if s.ndim != 1 or ss.shape != (s.shape[0], s.shape[0]):
            raise ValueError(f"moment shapes do not match: sum {s.shape}, sumsq {ss.shape}")
        mu = s / n
        # (Σxxᵀ − n μμᵀ)/(n−1); symmetrized so qᵀΣq sees no rounding asymmetry
        cov = (ss - n * np.outer(mu, mu)) / (n - 1)
        cov = (cov + cov.T) / 2
        return cls(n=n, mean=mu, cov=cov)

    @classmethod
    def of(cls, x: np.ndarray, chunk: int = 1 << 16) -> ArchiveMoments:
        """Moments of an embedding matrix (float64 accumulation, chunked for memmaps)."""
        xa = np.asarray(x) if not isinstance(x, np.memmap) else x
        d = xa.shape[1]
        s, ss = np.zeros(d), np.zeros((d, d))
        for i in range(0, xa.shape[0], chunk):
            c = np.asarray(xa[i : i + chunk], np.float64)
            s += c.sum(axis=0)
            ss += c.T @ c
        return cls.from_sums(_Sums(int(xa.shape[0]), s, ss))

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def query_stats(self, queries: np.ndarray) -> QueryStats:
        """Exact per-query mean and unbiased std of ``q·x`` over the archive, shape (Q, 1)."""
        q = np.atleast_2d(np.asarray(queries, np.float64))
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]}, archive moments have {self.dim}")
        mean = q @ self.mean
        var = np.einsum("qi,ij,qj->q", q, self.cov, q)
        std = np.sqrt(np.maximum(var, 0.0))  # tiny negative values are rounding of a 0 variance
        return QueryStats(mean=mean[:, None], std=std[:, None])


@dataclass(frozen=True)
class _Sums:
    n: int
    sum: np.ndarray
    sumsq: np.ndarray


def query_stats(queries: np.ndarray, moments: MomentsLike | ArchiveMoments) -> QueryStats:
    """:class:`QueryStats` for a batch of queries from ``store.moments()`` (or precomputed)."""
    am = moments if isinstance(moments, ArchiveMoments) else ArchiveMoments.from_sums(moments)
    return am.query_stats(queries)
