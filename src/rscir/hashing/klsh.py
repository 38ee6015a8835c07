"""Kernelized locality-sensitive hashing (Kulis & Grauman, ICCV 2009).

Random hyperplanes in the kernel's feature space: with ``p`` anchors, centred kernel matrix
``K`` and a random subset ``S`` of ``t`` anchors per bit, the hyperplane is approximately
Gaussian by the central limit theorem and the hash is ``h(x) = sign(Σ_i w_i κ̄(x, z_i))`` with
``w = K^{-1/2} e_S / t`` (``t = p // 2`` when a small training set gives fewer than ``t``
anchors). Kernel centring is scikit-learn's ``KernelCenterer``; ``K^{-1/2}``
is the pseudo-inverse square root (eigenvalues below ``1e-8·max`` dropped), which is what the
paper's derivation needs for the rank-deficient centred ``K``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.preprocessing import KernelCenterer
from sklearn.utils import check_random_state

from ..errors import InvalidArgumentError
from .base import BaseHasher
from .kernel import AnchorKernel


class KernelLSHHasher(BaseHasher):
    """Unsupervised LSH for an arbitrary kernel (default RBF)."""

    def __init__(
        self,
        n_bits: int = 64,
        *,
        n_anchors: int = 300,
        subset_size: int = 30,
        kernel: str = "rbf",
        gamma: float | None = None,
        random_state: int | None = None,
    ) -> None:
        super().__init__(n_bits, random_state=random_state)
        self.n_anchors = n_anchors
        self.subset_size = subset_size
        self.kernel = kernel
        self.gamma = gamma

    def _fit(self, X: np.ndarray, y: Any) -> None:
        rng = check_random_state(self.random_state)
        self.kernel_ = AnchorKernel.fit(X, self.n_anchors, self.kernel, self.gamma, rng)
        p = self.kernel_.anchors.shape[0]
        if int(self.subset_size) < 1:
            raise InvalidArgumentError(f"subset_size must be at least 1, got {self.subset_size}")
        # fewer anchors than the subset (a small training set): half of them per bit (all of
        # them would make every bit the same hyperplane)
        t = int(self.subset_size) if int(self.subset_size) <= p else max(1, p // 2)
        self.subset_size_ = t
        k = self.kernel_(self.kernel_.anchors)
        self.centerer_ = KernelCenterer().fit(k)
        kc = self.centerer_.transform(k)
        ev, vec = np.linalg.eigh((kc + kc.T) / 2)
        keep = ev > 1e-8 * max(float(ev.max()), 1e-300)
        inv_sqrt = (vec[:, keep] / np.sqrt(ev[keep])) @ vec[:, keep].T
        # t random anchors per bit, drawn without replacement (one argsort for all bits)
        subsets = np.argsort(rng.random_sample((self.n_bits_, p)), axis=1)[:, :t]
        e = np.zeros((p, self.n_bits_))
        e[subsets.T, np.arange(self.n_bits_)[None, :]] = 1.0 / t
        self.weights_ = inv_sqrt @ e

    def _project(self, X: np.ndarray) -> np.ndarray:
        return self.centerer_.transform(self.kernel_(X)) @ self.weights_
