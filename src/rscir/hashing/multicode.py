"""Multi-code hashing in the spirit of Demir & Bruzzone (IEEE TGRS 2016): several codes per
image, one per region (crop, segment, local descriptor), matched by summed Hamming distance.

Input is a 3-D array ``(n, m, d)`` (a 2-D ``(n, d)`` is one region per image): ``m`` region
vectors per image (for the classic encoder the
descriptors of image crops; for a neural encoder, the embeddings of crops). One hasher, fitted
on all regions pooled (labels repeated per region for supervised hashers), codes every region:
``transform`` returns ``(n, m, n_bits // 8)``.

Two matchings of a query's regions against an item's:

* ``aligned`` — region ``j`` against region ``j`` (regions at fixed positions): the summed
  distance is the Hamming distance of the concatenated codes, so any FAISS binary index ranks
  it exactly;
* ``min`` — each query region against its closest item region, summed over the query regions:
  invariant to where a pattern sits in the tile (rotations/flips of aerial scenes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils.validation import check_array, check_is_fitted

from ..errors import InvalidArgumentError
from .base import BaseHasher, check_codes, code_words, hamming_distances, popcount_rows

MATCHES: tuple[str, ...] = ("aligned", "min")


def _check_regions(X: Any, name: str = "X") -> np.ndarray:
    """``X`` as float64 ``(n, m, d)``: scikit-learn's validation (sparse, complex, NaN, empty
    input), a 2-D ``(n, d)`` read as one region per image."""
    x = check_array(X, dtype=np.float64, allow_nd=True, ensure_min_samples=1, input_name=name)
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3:
        raise InvalidArgumentError(
            f"{name} must be a 3-D array (n_images, n_regions, n_features) of region vectors "
            f"(or 2-D, one region per image), got shape {x.shape}"
        )
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise InvalidArgumentError(f"{name} needs at least one region and one feature, got shape {x.shape}")
    return x


def check_match(match: str) -> str:
    if match not in MATCHES:
        raise InvalidArgumentError(f"unknown match {match!r}; choose from {', '.join(MATCHES)}")
    return match


class MultiCodeHasher(TransformerMixin, BaseEstimator):
    """One code per region from a shared base hasher (any :class:`BaseHasher`)."""

    def __init__(
        self, hasher: BaseHasher, *, match: str = "min", random_state: int | None = None
    ) -> None:
        self.hasher = hasher
        self.match = match
        self.random_state = random_state

    def fit(self, X: Any, y: Any = None) -> MultiCodeHasher:
        x = _check_regions(X)
        check_match(self.match)
        n, m, d = x.shape
        if n * m < 2:
            raise InvalidArgumentError(f"n_samples={n} images with {m} region(s): need at least 2 regions")
        yy = None if y is None else np.repeat(np.asarray(y), m, axis=0)
        h = clone(self.hasher)
        if self.random_state is not None:  # one seed for the whole estimator, as sklearn expects
            h.set_params(random_state=self.random_state)
        self.hasher_ = h.fit(x.reshape(n * m, d), yy)
        self.n_regions_ = m
        self.n_features_in_ = d
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Packed codes ``(n, n_regions, n_bytes)`` uint8."""
        check_is_fitted(self, "hasher_")
        x = _check_regions(X)
        n, m, d = x.shape
        if d != self.n_features_in_:
            raise InvalidArgumentError(
                f"X has {d} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input (per region)."
            )
        return self.hasher_.transform(x.reshape(n * m, d)).reshape(n, m, -1)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = []
        tags.target_tags.required = bool(getattr(self.hasher, "supervised", False))
        return tags

    def distances(self, q_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Summed Hamming distances ``(Q, N)`` with this hasher's matching."""
        return multicode_distances(q_codes, codes, self.match)


def multicode_distances(
    q_codes: np.ndarray, codes: np.ndarray, match: str = "min", max_elems: int = 1 << 23
) -> np.ndarray:
    """Summed Hamming distances (Q, N) int32 between multi-codes ``(Q, mq, B)`` and
    ``(N, m, B)``; brute force, vectorized over a chunk of queries at a time."""
    check_match(match)
    q = check_codes(q_codes, name="query codes")
    c = check_codes(codes, q.shape[-1], name="archive codes")
    if q.ndim != 3 or c.ndim != 3:
        raise InvalidArgumentError(
            f"multi-codes must be 3-D (n, n_regions, n_bytes), got {q.shape} and {c.shape}"
        )
    (nq, mq, _), (n, m, _) = q.shape, c.shape
    if match == "aligned":
        if mq != m:
            raise InvalidArgumentError(f"aligned matching needs equal region counts, got {mq} and {m}")
        return hamming_distances(q.reshape(nq, -1), c.reshape(n, -1), max_elems)
    wq, wc = code_words(q), code_words(c)  # (nq, mq, w), (n, m, w)
    out = np.empty((nq, n), np.int32)
    step = max(1, max_elems // max(1, wc.size * mq))
    for s in range(0, nq, step):
        d = popcount_rows(wq[s : s + step, :, None, None, :] ^ wc[None, None, :, :, :])
        out[s : s + step] = d.min(axis=3).sum(axis=1)  # (b, mq, n, m) -> (b, n)
    return out
