"""Random-hyperplane LSH (Charikar 2002): bit ``j`` is the side of ``x`` w.r.t. a random
Gaussian hyperplane, so the expected Hamming distance grows with the angle between vectors.

Data-independent apart from an optional centring on the training mean: embeddings (CLIP, the
classic descriptor) are far from zero-mean, and uncentred hyperplanes through the origin then
give nearly constant bits that carry no information.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.utils import check_random_state

from .base import BaseHasher


class LSHHasher(BaseHasher):
    """Sign of random Gaussian projections of the (centred) vectors."""

    def __init__(
        self, n_bits: int = 64, *, center: bool = True, random_state: int | None = None
    ) -> None:
        super().__init__(n_bits, random_state=random_state)
        self.center = center

    def _fit(self, X: np.ndarray, y: Any) -> None:
        rng = check_random_state(self.random_state)
        self.mean_ = X.mean(axis=0) if self.center else np.zeros(X.shape[1])
        self.components_ = rng.standard_normal((X.shape[1], self.n_bits_))

    def _project(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean_) @ self.components_
