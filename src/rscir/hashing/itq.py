"""PCA-ITQ, iterative quantization (Gong & Lazebnik, CVPR 2011).

Project the centred data on its top ``n_bits`` principal directions, then learn an orthogonal
rotation ``R`` that minimizes the quantization loss ``‖B − VR‖²`` by alternating
``B = sign(VR)`` and the orthogonal Procrustes solution for ``R`` (one small SVD per
iteration). The PCA is scikit-learn's; the rotation loop is the paper's, a few lines.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.utils import check_random_state

from ..errors import InvalidArgumentError
from .base import BaseHasher


class ITQHasher(BaseHasher):
    """PCA to ``n_bits`` dimensions followed by a learned rotation; needs ``n_bits ≤ d``."""

    def __init__(
        self, n_bits: int = 64, *, n_iter: int = 50, random_state: int | None = None
    ) -> None:
        super().__init__(n_bits, random_state=random_state)
        self.n_iter = n_iter

    def _fit(self, X: np.ndarray, y: Any) -> None:
        n, d = X.shape
        if self.n_bits_ > min(n, d):
            raise InvalidArgumentError(
                f"PCA-ITQ needs n_bits <= min(n_samples, n_features) = {min(n, d)} "
                f"(one principal direction per bit), got n_bits={self.n_bits_}"
            )
        rng = check_random_state(self.random_state)
        self.pca_ = PCA(n_components=self.n_bits_, svd_solver="full").fit(X)
        v = self.pca_.transform(X)
        r, _ = np.linalg.qr(rng.standard_normal((self.n_bits_, self.n_bits_)))
        for _ in range(int(self.n_iter)):
            b = np.where(v @ r >= 0, 1.0, -1.0)
            ub, _, uat = np.linalg.svd(b.T @ v)
            r = uat.T @ ub.T
        self.rotation_ = r

    def _project(self, X: np.ndarray) -> np.ndarray:
        return self.pca_.transform(X) @ self.rotation_
