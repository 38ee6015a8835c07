"""Common ground of the hashing estimators: validation, bit packing and Hamming distances.

Every hasher is a scikit-learn estimator: ``fit(X, y=None)`` learns ``n_bits`` real-valued
projections, ``transform(X)`` returns their signs packed into bytes, ``(n, n_bits // 8)``
uint8 — the layout FAISS binary indexes take — so that ``n_bits`` must be a multiple of 8.
Subclasses implement ``_fit`` and ``_project`` only; validation (feature count, finite values,
fitted state) lives here once, with scikit-learn's own checks and messages.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from ..errors import InvalidArgumentError

# popcount of every byte value; the fallback for numpy < 2.0, which lacks np.bitwise_count
_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def check_n_bits(n_bits: Any) -> int:
    """``n_bits`` as an int, or a ValueError saying why codes need whole bytes."""
    if isinstance(n_bits, bool) or not isinstance(n_bits, numbers.Integral):
        raise InvalidArgumentError(f"n_bits must be an integer, got {n_bits!r}")
    if n_bits <= 0 or n_bits % 8:
        raise InvalidArgumentError(
            f"n_bits must be a positive multiple of 8 (codes are packed into bytes), got {n_bits}"
        )
    return int(n_bits)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Boolean ``(..., n_bits)`` -> packed uint8 ``(..., n_bits // 8)``."""
    b = np.asarray(bits, dtype=bool)
    if b.shape[-1] % 8:
        raise InvalidArgumentError(f"the number of bits must be a multiple of 8, got {b.shape[-1]}")
    return np.packbits(b, axis=-1)


def unpack_bits(codes: np.ndarray) -> np.ndarray:
    """Packed uint8 ``(..., n_bytes)`` -> uint8 0/1 ``(..., 8 * n_bytes)``."""
    return np.unpackbits(check_codes(codes), axis=-1)


def check_codes(codes: Any, n_bytes: int | None = None, *, name: str = "codes") -> np.ndarray:
    """Validated packed codes: a uint8 array of at least 2-D, ``n_bytes`` per code if given."""
    c = np.asarray(codes)
    if c.dtype != np.uint8:
        raise InvalidArgumentError(f"{name} must be packed uint8 bits (from transform()), got dtype {c.dtype}")
    if c.ndim < 2:
        raise InvalidArgumentError(f"{name} must be at least 2-D (n, n_bytes), got shape {c.shape}")
    if n_bytes is not None and c.shape[-1] != n_bytes:
        raise InvalidArgumentError(f"{name} have {c.shape[-1]} bytes per code, expected {n_bytes}")
    return np.ascontiguousarray(c)


def popcount_rows(x: np.ndarray) -> np.ndarray:
    """Sum of set bits over the last axis of an unsigned integer array."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).sum(axis=-1, dtype=np.int32)
    return _POP8[x.view(np.uint8)].sum(axis=-1, dtype=np.int32)  # pragma: no cover


def code_words(codes: np.ndarray) -> np.ndarray:
    """View codes as the widest unsigned words their length allows (fewer XORs/popcounts)."""
    nb = codes.shape[-1]
    for width, dt in ((8, np.uint64), (4, np.uint32), (2, np.uint16)):
        if nb % width == 0:
            return codes.view(dt)
    return codes


def hamming_distances(a: np.ndarray, b: np.ndarray, max_elems: int = 1 << 23) -> np.ndarray:
    """Brute-force Hamming distances ``(Q, N)`` int32 between packed codes ``a`` (Q, B) and
    ``b`` (N, B), by XOR + popcount in chunks of queries (memory ~``max_elems`` words)."""
    a = check_codes(a, name="query codes")
    b = check_codes(b, a.shape[1], name="archive codes")
    wa, wb = code_words(a), code_words(b)
    out = np.empty((wa.shape[0], wb.shape[0]), np.int32)
    step = max(1, max_elems // max(1, wb.size))
    for s in range(0, wa.shape[0], step):
        out[s : s + step] = popcount_rows(wa[s : s + step, None, :] ^ wb[None, :, :])
    return out


class BaseHasher(TransformerMixin, BaseEstimator):
    """A learned binary embedding: ``n_bits`` projections whose signs are the code bits.

    Subclasses set their hyper-parameters in ``__init__`` (stored as given, scikit-learn style)
    and implement ``_fit(X, y)`` and ``_project(X) -> (n, n_bits)`` float."""

    supervised: bool = False

    def __init__(self, n_bits: int = 64, *, random_state: int | None = None) -> None:
        self.n_bits = n_bits
        self.random_state = random_state

    # --- to implement --------------------------------------------------------------------------
    def _fit(self, X: np.ndarray, y: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _project(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- estimator API -------------------------------------------------------------------------
    def fit(self, X: Any, y: Any = None) -> BaseHasher:
        """Learn the projections from training vectors ``X`` (n, d) (and labels for supervised
        methods); returns self."""
        self.n_bits_ = check_n_bits(self.n_bits)
        X = validate_data(self, X, reset=True, dtype=np.float64, ensure_min_samples=2)
        if self.supervised and y is None:
            raise InvalidArgumentError(
                f"{type(self).__name__} requires y to be passed, but the target y is None "
                "(it is supervised: fit(X, y) with class labels or a 0/1 indicator matrix)"
            )
        self._fit(X, y)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Real-valued projections ``(n, n_bits)``; their signs are the bits."""
        check_is_fitted(self, "n_bits_")
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self._project(X)

    def transform(self, X: Any) -> np.ndarray:
        """Packed binary codes ``(n, n_bits // 8)`` uint8 (bit set where the projection > 0)."""
        return pack_bits(self.decision_function(X) > 0)

    def __sklearn_tags__(self) -> Any:
        # codes are packed uint8 whatever the input dtype; supervised hashers need y
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = []
        tags.target_tags.required = self.supervised
        return tags

    @property
    def n_bytes(self) -> int:
        """Bytes per code."""
        return check_n_bits(self.n_bits) // 8
