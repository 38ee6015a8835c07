"""Supervised hashing with kernels, KSH (Liu, Wang, Ji, Jiang & Chang, CVPR 2012).

Each bit is ``sign(k̄(x)ᵀa)`` with ``k̄(x)`` the mean-centred kernel values of ``x`` against
``m`` anchors. Bits are learned greedily so that code inner products fit the pairwise label
similarity ``S`` (+1 for pairs sharing a label, −1 otherwise — multi-label sets count as similar
when they share at least one label): bit ``k`` maximizes ``bᵀR b`` for the residue
``R = r·S − Σ_{j<k} b_j b_jᵀ``, first by the spectral relaxation (a generalized eigenproblem,
``scipy.linalg.eigh``), then refined on the sigmoid-smoothed objective with L-BFGS (the paper
uses plain gradient descent; L-BFGS is scipy's well-kept optimizer for the same smooth
problem). The refined vector is kept only if its *binary* objective is at least as good.

Training cost is O(l²) memory for ``l`` labelled samples, so at most ``n_train`` of them are
used (a random subset), as the paper does (it trains on 1,000-2,000 labelled samples).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.optimize
from sklearn.utils import check_random_state

from ..errors import InvalidArgumentError
from .base import BaseHasher
from .kernel import AnchorKernel


def label_matrix(y: Any, n: int) -> np.ndarray:
    """Labels as a boolean indicator matrix (n, L): 1-D class labels (any hashable type) or a
    2-D 0/1 multi-label indicator array."""
    arr = np.asarray(y)
    if arr.shape[0] != n:
        raise InvalidArgumentError(f"y has {arr.shape[0]} rows, X has {n}")
    if arr.ndim == 1:
        _, inv = np.unique(arr, return_inverse=True)
        out = np.zeros((n, int(inv.max()) + 1), bool)
        out[np.arange(n), inv] = True
        return out
    if arr.ndim == 2:
        if not np.isin(arr, [0, 1]).all():
            raise InvalidArgumentError("a 2-D y must be a 0/1 multi-label indicator matrix")
        return arr.astype(bool)
    raise InvalidArgumentError(f"y must be 1-D class labels or a 2-D indicator matrix, got shape {arr.shape}")


def pairwise_similarity(labels: np.ndarray) -> np.ndarray:
    """+1 where two items share at least one label, −1 otherwise (float64, l×l)."""
    lab = labels.astype(np.float64)
    return np.where(lab @ lab.T > 0, 1.0, -1.0)


class KSHHasher(BaseHasher):
    """Kernel-based supervised hashing; ``fit(X, y)`` needs class or multi-label targets."""

    supervised = True

    def __init__(
        self,
        n_bits: int = 64,
        *,
        n_anchors: int = 300,
        n_train: int = 2000,
        kernel: str = "rbf",
        gamma: float | None = None,
        max_iter: int = 100,
        random_state: int | None = None,
    ) -> None:
        super().__init__(n_bits, random_state=random_state)
        self.n_anchors = n_anchors
        self.n_train = n_train
        self.kernel = kernel
        self.gamma = gamma
        self.max_iter = max_iter

    def _fit(self, X: np.ndarray, y: Any) -> None:
        rng = check_random_state(self.random_state)
        labels = label_matrix(y, X.shape[0])
        self.kernel_ = AnchorKernel.fit(X, self.n_anchors, self.kernel, self.gamma, rng)
        n_l = min(int(self.n_train), X.shape[0])
        sel = np.sort(rng.choice(X.shape[0], n_l, replace=False))
        k = self.kernel_(X[sel])
        self.kernel_mean_ = k.mean(axis=0)
        kc = k - self.kernel_mean_
        r = self.n_bits_ * pairwise_similarity(labels[sel])
        # Whiten the kernel features once: with K̄ᵀK̄ = UΛUᵀ and P = U Λ^{-1/2} (near-null
        # directions dropped), M = K̄P has orthonormal columns, so each bit's generalized
        # eigenproblem becomes a standard one in M's coordinates and L-BFGS sees a
        # well-conditioned problem; a = P v maps a solution back.
        ev, u = np.linalg.eigh(kc.T @ kc)
        keep = ev > 1e-10 * max(float(ev.max()), 1e-300)
        p_mat = u[:, keep] / np.sqrt(ev[keep])
        m_mat = kc @ p_mat
        rm = r @ m_mat  # R·M, updated by a rank-one term per bit
        scale = np.sqrt(n_l)
        weights = np.zeros((kc.shape[1], self.n_bits_))
        self.n_iter_ = 0  # most L-BFGS iterations any bit took (scikit-learn's n_iter_)
        for bit in range(self.n_bits_):  # greedy over bits (not items)
            a_red = m_mat.T @ rm
            _, vec = np.linalg.eigh((a_red + a_red.T) / 2)
            v = vec[:, -1] * scale  # ‖Mv‖² = l, as in the paper
            best = _binary_objective(m_mat @ v, r)
            res = scipy.optimize.minimize(
                _smooth_objective, v, args=(m_mat, r), jac=True, method="L-BFGS-B",
                options={"maxiter": int(self.max_iter)},
            )
            self.n_iter_ = max(self.n_iter_, int(res.nit))
            if np.all(np.isfinite(res.x)) and _binary_objective(m_mat @ res.x, r) >= best:
                v = res.x
            b = np.where(m_mat @ v > 0, 1.0, -1.0)
            r -= np.outer(b, b)
            rm -= np.outer(b, b @ m_mat)
            weights[:, bit] = p_mat @ v
        self.weights_ = weights

    def _project(self, X: np.ndarray) -> np.ndarray:
        return (self.kernel_(X) - self.kernel_mean_) @ self.weights_


def _binary_objective(proj: np.ndarray, r: np.ndarray) -> float:
    b = np.where(proj > 0, 1.0, -1.0)
    return float(b @ r @ b)


def _smooth_objective(a: np.ndarray, kc: np.ndarray, r: np.ndarray) -> tuple[float, np.ndarray]:
    """``−φᵀRφ`` with ``φ = 2σ(K̄a) − 1 = tanh(K̄a/2)`` and its gradient."""
    phi = np.tanh((kc @ a) / 2.0)
    rphi = r @ phi
    return -float(phi @ rphi), -kc.T @ (rphi * (1.0 - phi * phi))
