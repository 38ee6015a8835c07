"""Anchor-based kernel features shared by kernelized LSH and KSH.

Both methods express a hash function as ``sign(Σ_j a_j κ(x, z_j))`` over ``p`` anchors
``z_j`` sampled from the training set, so one anchor set and one kernel evaluation
``κ(X, Z)`` (scikit-learn's ``pairwise_kernels``) serve every bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics.pairwise import euclidean_distances, manhattan_distances, pairwise_kernels

from ..errors import InvalidArgumentError

GAMMA_KERNELS = frozenset({"rbf", "laplacian", "sigmoid", "polynomial", "poly", "chi2"})


@dataclass(frozen=True)
class AnchorKernel:
    """``κ(·, anchors)`` with a fixed kernel name and ``gamma``."""

    anchors: np.ndarray
    kernel: str
    gamma: float | None

    @classmethod
    def fit(
        cls,
        X: np.ndarray,
        n_anchors: int,
        kernel: str,
        gamma: float | None,
        rng: np.random.RandomState,
    ) -> AnchorKernel:
        """Sample ``min(n_anchors, n)`` distinct anchors; for the RBF kernel without a given
        ``gamma``, use the KSH paper's heuristic ``γ = 1 / (2·mean squared distance)``
        (training vectors to anchors), so the kernel adapts to the feature scale; for the
        Laplacian kernel, ``γ = 1 / mean L1 distance``."""
        if int(n_anchors) < 2:
            raise InvalidArgumentError(f"n_anchors must be at least 2, got {n_anchors}")
        p = min(int(n_anchors), X.shape[0])
        anchors = X[np.sort(rng.choice(X.shape[0], p, replace=False))]
        g = gamma
        if g is None and kernel == "rbf":
            d2 = euclidean_distances(X, anchors, squared=True)
            g = 1.0 / (2.0 * max(float(d2.mean()), 1e-12))
        elif g is None and kernel == "laplacian":  # exp(−γ‖x − a‖₁): scale by the L1 distance
            g = 1.0 / max(float(manhattan_distances(X, anchors).mean()), 1e-12)
        return cls(anchors=anchors, kernel=kernel, gamma=None if g is None else float(g))

    def __call__(self, X: np.ndarray) -> np.ndarray:
        kw = {"gamma": self.gamma} if self.gamma is not None and self.kernel in GAMMA_KERNELS else {}
        return pairwise_kernels(X, self.anchors, metric=self.kernel, **kw)
