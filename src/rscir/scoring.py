"""Similarity fusion for composed queries (image + text), vectorized over archive and queries.

All functions take cosine-similarity matrices of shape ``(Q, N)`` (queries × archive items) or
``(N,)`` and return fused scores of the same shape; higher is better.

WeiCom (Psomas et al., IGARSS 2024) normalizes each query's similarities over the *whole archive*
(mean and unbiased std, then the standard normal CDF) before the λ-weighted fusion. When only a
slice of the archive is scored (chunks, ANN candidates), pass the per-query statistics of the full
archive as :class:`QueryStats` so the normalization stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

METHODS: tuple[str, ...] = ("image", "text", "average", "weicom", "sum", "product")
NEEDS_IMAGE = frozenset({"image", "average", "weicom", "sum", "product"})
NEEDS_TEXT = frozenset({"text", "average", "weicom", "sum", "product"})


@dataclass(frozen=True)
class QueryStats:
    """Per-query mean and unbiased std of similarities over the whole archive, shape ``(Q, 1)``."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def of(cls, sims: np.ndarray) -> QueryStats:
        """Statistics of full-archive similarities (last axis = archive), float64 accumulation."""
        s = np.asarray(sims)
        if s.shape[-1] < 2:
            raise ValueError("WeiCom normalization needs an archive of at least 2 items")
        mean = s.mean(axis=-1, keepdims=True, dtype=np.float64)
        std = s.std(axis=-1, keepdims=True, ddof=1, dtype=np.float64)
        return cls(mean=mean, std=std)


def norm_cdf(sims: np.ndarray, stats: QueryStats | None = None) -> np.ndarray:
    """Standardize per query (unbiased std) and map through the standard normal CDF."""
    s = np.asarray(sims)
    st = stats if stats is not None else QueryStats.of(s)
    std = np.where(st.std > 0, st.std, 1.0)  # a constant row carries no ranking information
    z = (s - st.mean.astype(s.dtype, copy=False)) / std.astype(s.dtype, copy=False)
    return ndtr(z).astype(s.dtype, copy=False)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return method


def check_lam(lam: float) -> float:
    lam = float(lam)
    if not 0.0 <= lam <= 1.0 or np.isnan(lam):
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    return lam


def fuse(
    method: str,
    sim_img: np.ndarray | None,
    sim_txt: np.ndarray | None,
    lam: float = 0.5,
    *,
    img_stats: QueryStats | None = None,
    txt_stats: QueryStats | None = None,
) -> np.ndarray:
    """Fused scores for one method.

    ``image``/``text``: the raw cosine similarity; ``average``: their mean; ``sum``/``product``:
    their sum/product; ``weicom``: ``λ·Φ(z_text) + (1−λ)·Φ(z_image)``. At λ=0 and λ=1 WeiCom
    returns exactly the normalized image/text scores, whose order equals the raw image/text order
    (Φ and the per-query affine map are strictly increasing).
    """
    check_method(method)
    if method in NEEDS_IMAGE and sim_img is None:
        raise ValueError(f"method {method!r} needs a query image")
    if method in NEEDS_TEXT and sim_txt is None:
        raise ValueError(f"method {method!r} needs a query text")
    if method == "image":
        return np.asarray(sim_img)
    if method == "text":
        return np.asarray(sim_txt)
    a, b = np.asarray(sim_img), np.asarray(sim_txt)
    if method == "average":
        return (a + b) / 2
    if method == "sum":
        return a + b
    if method == "product":
        return a * b
    lam = check_lam(lam)
    ni = norm_cdf(a, img_stats)
    if lam == 0.0:
        return ni
    nt = norm_cdf(b, txt_stats)
    if lam == 1.0:
        return nt
    return lam * nt + (1.0 - lam) * ni


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k best scores per row, best first; equal scores by lower
    index, also at the k-th place (so every strategy and backend returns the same rows on
    ties, which are the rule for Hamming scores). NaN ranks last. One partition plus a few
    O(N) passes, no full sort."""
    s = np.atleast_2d(np.asarray(scores))
    q, n = s.shape
    k = max(0, min(int(k), n))
    if k == 0:
        return np.empty((q, 0), np.int64), np.empty((q, 0), s.dtype)
    key = s
    if s.dtype.kind == "f" and np.isnan(s).any():
        key = np.where(np.isnan(s), -np.inf, s)
    kth = -np.partition(-key, k - 1, axis=1)[:, k - 1 : k]  # the k-th best value per row
    above = key > kth
    room = k - above.sum(axis=1, keepdims=True)  # how many items equal to it fit
    eq = key == kth
    take = above | (eq & (np.cumsum(eq, axis=1) <= room))
    idx = np.nonzero(take)[1].reshape(q, k)  # row-major: index order within each row
    order = np.lexsort((idx, -np.take_along_axis(key, idx, axis=1)), axis=1)
    idx = np.take_along_axis(idx, order, axis=1).astype(np.int64, copy=False)
    return idx, np.take_along_axis(s, idx, axis=1)
