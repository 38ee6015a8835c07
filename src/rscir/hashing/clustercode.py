"""Cluster-sensitive multi-code hashing (Reato, Demir & Bruzzone, IEEE GRSL 2019).

1. Each image is segmented into regions, each region described by intensity, texture and shape
   (:class:`~rscir.hashing.regions.RegionDescriber`; precomputed descriptors work too).
2. A Gaussian mixture fitted by EM on the (standardized) training regions defines ``n_clusters``
   *primitive clusters* ``C_k``.
3. For image ``i`` and cluster ``k`` the descriptor is the mean of the image's regions with
   posterior ``P(C_k | region) ≥ threshold``, or the **zero vector** when no region reaches the
   threshold (the cluster is *absent* from the image).
4. One kernel LSH (:class:`~rscir.hashing.klsh.KernelLSHHasher`; any :class:`BaseHasher` can
   be given) per cluster, fitted on the training images where the cluster is present, hashes
   the cluster descriptors into ``n_bits`` bits.
5. Query ``q`` and image ``x`` are compared by ``Σ_{k present in q} Hamming(c_qk, c_xk)``:
   clusters absent from the query are skipped, an image lacking a cluster the query has is
   compared through the code of its zero descriptor (``absent="zero"``, the seed's rule) or,
   with ``absent="max"``, at the full cost ``n_bits`` (a variant that is not in the seed).

Codes are one packed uint8 row per image, ``ceil((n_clusters·n_bits + n_clusters) / 8)``
bytes: the cluster codes (cluster by cluster, ``n_bits`` each, any ``n_bits ≥ 1``) followed by
one presence bit per cluster; :func:`split_cluster_codes` takes a row apart and
:func:`cluster_multicode_distances` computes the matching as a masked popcount.

Descriptors are averaged in their raw units (the zero vector is raw zero, as in the seed) and
standardized with the training regions' mean and scale before clustering and hashing. The
optional supervised variant: a supervised per-cluster hasher (e.g. KSH) gets the images'
labels as weak labels of their cluster descriptors (``fit(X, y)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.mixture import GaussianMixture
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from ..errors import InvalidArgumentError
from .base import BaseHasher, check_codes, code_words, popcount_rows
from .klsh import KernelLSHHasher
from .regions import RegionDescriber


class RegionSets:
    """Ragged region descriptors of ``n_images``: rows ``values`` (R, d), ``owner`` (R,)."""

    def __init__(self, values: np.ndarray, owner: np.ndarray, n_images: int) -> None:
        self.values, self.owner, self.n_images = values, owner, n_images

    @classmethod
    def from_list(cls, sets: Sequence[np.ndarray]) -> RegionSets:
        arrs = [check_array(s, dtype=np.float64, ensure_min_samples=0,
                            input_name="region descriptors") for s in sets]
        dims = {a.shape[1] for a in arrs}
        if len(dims) > 1:
            raise InvalidArgumentError(f"region descriptors of different lengths: {sorted(dims)}")
        d = dims.pop() if dims else 0
        values = np.concatenate(arrs) if arrs else np.zeros((0, d))
        owner = np.repeat(np.arange(len(arrs)), [len(a) for a in arrs])
        return cls(values, owner, len(arrs))


def _is_image(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image) or (isinstance(x, np.ndarray) and x.ndim == 3)


class ClusterMultiCodeHasher(TransformerMixin, BaseEstimator):
    """One ``n_bits`` code per primitive cluster and image, plus presence bits.

    ``X`` (fit/transform) is any of: a sequence of images (PIL images or H×W×C arrays), described
    by ``describer`` (default :class:`RegionDescriber`); a sequence of 2-D arrays (the region
    descriptors of each image, any number of rows, zero allowed); a 3-D array
    ``(n, m, d)`` (``m`` regions per image); a 2-D array ``(n, d)`` (one region per image).
    """

    def __init__(
        self,
        n_bits: int = 8,
        *,
        n_clusters: int = 8,
        threshold: float = 0.5,
        covariance_type: str = "diag",
        reg_covar: float = 1e-3,
        absent: str = "zero",
        hasher: BaseHasher | None = None,
        describer: RegionDescriber | None = None,
        random_state: int | None = None,
    ) -> None:
        self.n_bits = n_bits
        self.n_clusters = n_clusters
        self.threshold = threshold
        self.covariance_type = covariance_type
        self.reg_covar = reg_covar
        self.absent = absent
        self.hasher = hasher
        self.describer = describer
        self.random_state = random_state

    # --- input ---------------------------------------------------------------------------------
    def _regions(self, X: Any, reset: bool) -> RegionSets:
        if isinstance(X, (list, tuple)) or (isinstance(X, np.ndarray) and X.dtype == object
                                            and X.ndim == 1):
            items = list(X)
            if items and all(_is_image(x) for x in items):
                desc = self.describer if self.describer is not None else RegionDescriber()
                return self._checked(RegionSets.from_list(desc.describe(items)), reset)
            if items and all(isinstance(x, np.ndarray) and x.ndim == 2 for x in items):
                return self._checked(RegionSets.from_list(items), reset)
        if isinstance(X, np.ndarray) and X.ndim == 4:  # a batch of equal-size images
            return self._regions(list(X), reset)
        if isinstance(X, np.ndarray) and X.ndim == 3 and X.dtype != object:
            x = check_array(X, dtype=np.float64, allow_nd=True, ensure_min_samples=2 if reset
                            else 1)
            n, m, d = x.shape
            return self._checked(RegionSets(x.reshape(n * m, d), np.repeat(np.arange(n), m), n),
                                 reset)
        x = validate_data(self, X, reset=reset, dtype=np.float64,
                          ensure_min_samples=2 if reset else 1)  # (n, d): one region per image
        return RegionSets(x, np.arange(len(x)), len(x))

    def _checked(self, rs: RegionSets, reset: bool) -> RegionSets:
        d = rs.values.shape[1]
        if reset:
            if rs.n_images < 2:
                raise InvalidArgumentError(f"n_samples={rs.n_images}: fit needs at least 2 images")
            self.n_features_in_ = d
        elif len(rs.values) and d != self.n_features_in_:
            raise InvalidArgumentError(f"X has {d} features, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input (per region).")
        return rs

    # --- fit / transform -----------------------------------------------------------------------
    def fit(self, X: Any, y: Any = None) -> ClusterMultiCodeHasher:
        """Fit the region scaler, the Gaussian mixture and one hasher per cluster."""
        b, k = int(self.n_bits), int(self.n_clusters)
        if isinstance(self.n_bits, bool) or b < 1 or b != self.n_bits:
            raise InvalidArgumentError(f"n_bits (bits per cluster code) must be a positive integer, got "
                             f"{self.n_bits!r}")
        check_absent(self.absent)
        if k < 1 or not 0.0 < float(self.threshold) <= 1.0:
            raise InvalidArgumentError(f"n_clusters must be >= 1 and threshold in (0, 1], got "
                             f"{self.n_clusters}, {self.threshold}")
        if y is None and getattr(self.hasher, "supervised", False):
            raise InvalidArgumentError(f"{type(self).__name__} with a supervised hasher requires y to be "
                             "passed, but the target y is None")
        rs = self._regions(X, reset=True)
        if len(rs.values) < k:
            raise InvalidArgumentError(f"n_clusters={k} needs at least {k} training regions, got "
                             f"{len(rs.values)}")
        rng = check_random_state(self.random_state)
        self.scaler_ = StandardScaler().fit(rs.values)
        self.gmm_ = GaussianMixture(
            k, covariance_type=self.covariance_type, reg_covar=float(self.reg_covar),
            random_state=rng.randint(np.iinfo(np.int32).max),
        ).fit(self.scaler_.transform(rs.values))
        desc, present = self._cluster_descriptors(rs)
        base = self.hasher if self.hasher is not None else KernelLSHHasher()
        labels = None if y is None else np.asarray(y)
        if labels is not None and len(labels) != rs.n_images:
            raise InvalidArgumentError(f"y has {len(labels)} rows, X has {rs.n_images} images")
        self.hashers_ = []
        for c in range(k):
            rows = np.flatnonzero(present[:, c])
            if len(rows) < 2:  # a cluster (almost) no training image has: hash all of them
                rows = np.arange(rs.n_images)
            h = clone(base).set_params(n_bits=-(-b // 8) * 8,
                                       random_state=rng.randint(np.iinfo(np.int32).max))
            yy = labels[rows] if labels is not None and getattr(h, "supervised", False) else None
            self.hashers_.append(h.fit(desc[rows, c], yy))
        self.n_bits_, self.n_clusters_ = b, k
        self.n_bytes_ = -(-(k * b + k) // 8)
        return self

    def _cluster_descriptors(self, rs: RegionSets) -> tuple[np.ndarray, np.ndarray]:
        """Standardized per-cluster descriptors (n, K, d) and presence (n, K)."""
        k, d = self.gmm_.n_components, rs.values.shape[1]
        n = rs.n_images
        if len(rs.values):
            passed = self.gmm_.predict_proba(self.scaler_.transform(rs.values)) >= self.threshold
        else:
            passed = np.zeros((0, k), bool)
        counts = np.zeros((n, k))
        np.add.at(counts, rs.owner, passed)
        sums = np.zeros((n, k, d))
        np.add.at(sums, rs.owner, passed[:, :, None] * rs.values[:, None, :])
        present = counts > 0
        raw = np.divide(sums, counts[:, :, None], out=np.zeros_like(sums),
                        where=present[:, :, None])  # raw zero where the cluster is absent
        return self.scaler_.transform(raw.reshape(n * k, d)).reshape(n, k, d), present

    def transform(self, X: Any) -> np.ndarray:
        """Packed codes ``(n, n_bytes_)`` uint8: cluster codes, then presence bits."""
        check_is_fitted(self, "hashers_")
        rs = self._regions(X, reset=False)
        desc, present = self._cluster_descriptors(rs)
        bits = [h.decision_function(desc[:, c])[:, : self.n_bits_] > 0
                for c, h in enumerate(self.hashers_)]
        return np.packbits(np.concatenate([*bits, present], axis=1), axis=1)

    def distances(self, q_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Multi-hash-code distances (Q, N): summed over the clusters present in each query."""
        check_is_fitted(self, "hashers_")
        return cluster_multicode_distances(q_codes, codes, self.n_clusters_, self.n_bits_,
                                           absent=self.absent)

    def search(self, q_codes: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray,
                                                                             np.ndarray]:
        """Rows (Q, k) and distances (Q, k) of the ``k`` nearest codes, ties by lower row."""
        from ..scoring import topk

        idx, neg = topk(-self.distances(q_codes, codes).astype(np.int64), k)
        return idx, (-neg).astype(np.int32)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = []
        tags.target_tags.required = bool(getattr(self.hasher, "supervised", False))
        return tags


ABSENT: tuple[str, ...] = ("zero", "max")


def check_absent(absent: str) -> str:
    if absent not in ABSENT:
        raise InvalidArgumentError(f"unknown absent rule {absent!r}; choose from {', '.join(ABSENT)}")
    return absent


def split_cluster_codes(codes: np.ndarray, n_clusters: int, n_bits: int) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
    """Packed rows -> cluster bits ``(n, n_clusters, n_bits)`` uint8 0/1 and presence
    ``(n, n_clusters)`` bool."""
    c = check_codes(codes, -(-(n_clusters * n_bits + n_clusters) // 8))
    u = np.unpackbits(c, axis=1)
    kb = n_clusters * n_bits
    return u[:, :kb].reshape(len(c), n_clusters, n_bits), u[:, kb : kb + n_clusters].astype(bool)


def _bit_masks(codes: np.ndarray, n_clusters: int, n_bits: int) -> np.ndarray:
    """Packed masks: ones over the code bits of the clusters present in each row."""
    _, present = split_cluster_codes(codes, n_clusters, n_bits)
    m = np.zeros((len(codes), codes.shape[1] * 8), bool)
    m[:, : n_clusters * n_bits] = np.repeat(present, n_bits, axis=1)
    return np.packbits(m, axis=1)


def cluster_multicode_distances(
    q_codes: np.ndarray, codes: np.ndarray, n_clusters: int, n_bits: int, *,
    absent: str = "zero", max_elems: int = 1 << 23,
) -> np.ndarray:
    """Multi-hash-code distances (Q, N) int32, summed over the clusters present in the query.

    ``absent="zero"`` (the seed): an image lacking the cluster is compared through the code of
    its zero descriptor, ``popcount((q ⊕ x) ∧ mask_q)``. ``absent="max"``: it costs the full
    ``n_bits`` instead, ``popcount((q ⊕ x) ∧ mask_q ∧ mask_x) + n_bits·#(present in q, not x)``.
    Chunked over queries."""
    check_absent(absent)
    nb = -(-(n_clusters * n_bits + n_clusters) // 8)
    q = check_codes(q_codes, nb, name="query codes")
    x = check_codes(codes, nb, name="archive codes")
    wq, wmq, wx = code_words(q), code_words(_bit_masks(q, n_clusters, n_bits)), code_words(x)
    out = np.empty((len(q), len(x)), np.int32)
    step = max(1, max_elems // max(1, wx.size))
    if absent == "zero":
        for s in range(0, len(q), step):
            out[s : s + step] = popcount_rows(
                (wq[s : s + step, None, :] ^ wx[None, :, :]) & wmq[s : s + step, None, :])
        return out
    wmx = code_words(_bit_masks(x, n_clusters, n_bits))
    _, pq = split_cluster_codes(q, n_clusters, n_bits)
    _, px = split_cluster_codes(x, n_clusters, n_bits)
    missing = pq.astype(np.int32) @ (~px).astype(np.int32).T  # present in q, absent in x
    for s in range(0, len(q), step):
        out[s : s + step] = popcount_rows(
            (wq[s : s + step, None, :] ^ wx[None, :, :]) & wmq[s : s + step, None, :]
            & wmx[None, :, :])
    return out + n_bits * missing
