"""Similarity fusion for composed queries (image + text), vectorized over archive and queries.

All functions take similarity matrices of shape ``(Q, N)`` (queries × archive items) or
``(N,)`` and return fused scores of the same shape; higher is better.

Two families (``FUSIONS``):

* moment-normalized or raw, monotone in both similarities: ``image``, ``text``, ``average``,
  ``sum``, ``product`` and ``weicom``. :func:`fuse` scores any slice of the archive exactly when
  given the full-archive :class:`QueryStats` (from :mod:`rscir.moments`).
* normalized by the per-query *minimum and maximum over the whole archive* (which no moment
  gives, so they need every row): ``minmax`` (λ-weighted sum of min-max normalized scores, as
  EarthEmbeddingExplorer) and ``harris`` (BASIC's Harris-corner criterion on min-max normalized
  scores, Psomas et al., NeurIPS 2025). :func:`combine` takes full rows (or the row minima and
  maxima) for them.

WeiCom (Psomas et al., IGARSS 2024) normalizes each query's similarities over the *whole archive*
(mean and unbiased std, then the standard normal CDF) before the λ-weighted fusion. When only a
slice of the archive is scored (chunks, ANN candidates), pass the per-query statistics of the full
archive as :class:`QueryStats` so the normalization stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from ..errors import InvalidArgumentError, QueryError

# The methods :func:`fuse` scores from two similarity matrices alone (plus moment statistics).
# Kept as they were: every strategy of the search layer handles exactly these. The full list
# of method names (with centring, projection, query expansion, min-max and Harris fusions) is
# the registry in :mod:`rscir.scoring.methods`.
METHODS: tuple[str, ...] = ("image", "text", "average", "weicom", "sum", "product")
NEEDS_IMAGE = frozenset({"image", "average", "weicom", "sum", "product"})
NEEDS_TEXT = frozenset({"text", "average", "weicom", "sum", "product"})

# Every fusion of two similarity rows; the λ-weighted ones; those normalized by archive min/max.
FUSIONS: tuple[str, ...] = METHODS + ("minmax", "harris")
LAMBDA_FUSIONS = frozenset({"weicom", "minmax", "harris"})
RANGE_FUSIONS = frozenset({"minmax", "harris"})
DEFAULT_HARRIS_H = 0.1  # BASIC's default; the λ-weighted form below ranks as image/text at
# λ = 0/1 for any 0 <= h < 1/4


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
            raise InvalidArgumentError("WeiCom normalization needs an archive of at least 2 items")
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
    """A name :func:`fuse` handles (see :func:`rscir.scoring.methods.method_spec` for all)."""
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return method


def check_lam(lam: float) -> float:
    lam = float(lam)
    if not 0.0 <= lam <= 1.0 or np.isnan(lam):
        raise InvalidArgumentError(f"lambda must be in [0, 1], got {lam}")
    return lam


def check_harris_h(h: float) -> float:
    h = float(h)
    if not 0.0 <= h < 0.25 or np.isnan(h):
        raise InvalidArgumentError(
            f"the Harris weight h must be in [0, 0.25) (so that λ = 0/1 rank as image/text "
            f"only), got {h}"
        )
    return h


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
        raise QueryError(f"method {method!r} needs a query image")
    if method in NEEDS_TEXT and sim_txt is None:
        raise QueryError(f"method {method!r} needs a query text")
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


def minmax_norm(
    sims: np.ndarray, lo: np.ndarray | None = None, hi: np.ndarray | None = None
) -> np.ndarray:
    """``(s − min)/(max − min)`` per query, min and max over the last axis unless given (then
    ``(Q, 1)``: the full-archive values when ``sims`` is a slice). A constant row maps to 0."""
    s = np.asarray(sims)
    lo = s.min(axis=-1, keepdims=True) if lo is None else np.asarray(lo)
    hi = s.max(axis=-1, keepdims=True) if hi is None else np.asarray(hi)
    span = hi - lo
    out = (s - lo) / np.where(span > 0, span, 1.0)
    return np.where(span > 0, out, 0.0).astype(s.dtype, copy=False)


def harris(a: np.ndarray, b: np.ndarray, lam: float = 0.5, h: float = DEFAULT_HARRIS_H) -> np.ndarray:
    """λ-weighted Harris criterion of two scores in [0, 1]: with ``A = a^{2(1−λ)}`` and
    ``B = b^{2λ}``, ``A·B − h·(A + B)²`` (BASIC's ``a·b − h(a+b)²`` at λ = 0.5).

    The product rewards items good in both modalities, the trace term penalizes items good in
    only one. λ enters as exponents so that λ = 0 / 1 rank exactly as ``a`` / ``b``
    (``u − h(u+1)²`` increases on [0, 1] for h < 1/4); those endpoints return ``a`` / ``b``."""
    lam = check_lam(lam)
    h = check_harris_h(h)
    a, b = np.asarray(a), np.asarray(b)
    if lam == 0.0:
        return a
    if lam == 1.0:
        return b
    pa = np.power(a, 2.0 * (1.0 - lam))
    pb = np.power(b, 2.0 * lam)
    return pa * pb - h * (pa + pb) ** 2


def combine(
    fusion: str,
    sim_img: np.ndarray | None,
    sim_txt: np.ndarray | None,
    lam: float = 0.5,
    *,
    img_stats: QueryStats | None = None,
    txt_stats: QueryStats | None = None,
    img_range: tuple[np.ndarray, np.ndarray] | None = None,
    txt_range: tuple[np.ndarray, np.ndarray] | None = None,
    harris_h: float = DEFAULT_HARRIS_H,
) -> np.ndarray:
    """Any fusion of :data:`FUSIONS`. The first six are :func:`fuse`; ``minmax`` is
    ``λ·mm(text) + (1−λ)·mm(image)`` and ``harris`` is :func:`harris` of ``mm(image)``,
    ``mm(text)``, with ``mm`` = :func:`minmax_norm` over the whole archive: pass full rows, or
    ``img_range``/``txt_range`` = (min, max) each ``(Q, 1)`` of the full rows."""
    if fusion in METHODS:
        return fuse(fusion, sim_img, sim_txt, lam, img_stats=img_stats, txt_stats=txt_stats)
    if fusion not in RANGE_FUSIONS:
        raise InvalidArgumentError(f"unknown fusion {fusion!r}; choose from {', '.join(FUSIONS)}")
    lam = check_lam(lam)
    if sim_img is None and lam < 1.0:
        raise QueryError(f"fusion {fusion!r} needs a query image (or λ = 1)")
    if sim_txt is None and lam > 0.0:
        raise QueryError(f"fusion {fusion!r} needs a query text (or λ = 0)")
    a = None if lam == 1.0 or sim_img is None else minmax_norm(
        sim_img, *(img_range or (None, None)))
    b = None if lam == 0.0 or sim_txt is None else minmax_norm(
        sim_txt, *(txt_range or (None, None)))
    if a is None:
        assert b is not None  # λ = 1 needs a text (checked above)
        return b
    if b is None:
        return a
    if fusion == "harris":
        return harris(a, b, lam, harris_h)
    return lam * b + (1.0 - lam) * a


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
