"""Text-derived feature bases: the text centre and the contrastive-PCA projection (BASIC).

BASIC (Psomas et al., NeurIPS 2025) embeds an *object* word list ``A`` and a *style* list ``B``
with the model's text tower, centres both by the mean ``μ_t`` of ``A``, forms their scatter
matrices ``S_A = AᵀA/(|A|−1)``, ``S_B = BᵀB/(|B|−1)`` and keeps the leading eigenvectors ``V``
(positive eigenvalues only) of ``C = (1−α)·S_A − α·S_B``: directions along which objects vary
and styles do not. The projection ``P = VVᵀ`` is applied to the (centred) *query image* only —
``(P q)·x = q·(P x)``, so one side is enough — and ``μ_t`` centres the query text.

Everything here is a pure function of the encoder and the word lists: :class:`TextBasisCache`
memoizes it per model key (the caller's choice, e.g. the weights fingerprint), so a server
computes it once per model and word-list set. Nothing is fitted to any archive or benchmark.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidArgumentError

TextEncoder = Callable[[list[str]], np.ndarray]
DEFAULT_ALPHA = 0.2  # BASIC's weight of the style scatter


@dataclass(frozen=True)
class TextBasis:
    """``text_mean`` (d,) = mean object embedding; ``components`` (k, d) orthonormal rows
    (``None``: no projection); ``eigenvalues`` (k,) of the contrastive scatter."""

    text_mean: np.ndarray
    components: np.ndarray | None = None
    eigenvalues: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.text_mean.shape[0])

    @property
    def n_components(self) -> int:
        return 0 if self.components is None else int(self.components.shape[0])

    def project(self, q: np.ndarray) -> np.ndarray:
        """``P q`` per row, ``P = VᵀV`` (identity without components), in float64."""
        q = np.asarray(q, np.float64)
        if self.components is None:
            return q
        v = self.components
        return (q @ v.T) @ v


def _embed(encode_texts: TextEncoder, words: Sequence[str], what: str) -> np.ndarray:
    words = [str(w) for w in words]
    if len(words) < 2:
        raise InvalidArgumentError(f"the {what} word list needs at least 2 entries, got {words}")
    e = np.asarray(encode_texts(words), np.float64)
    if e.ndim != 2 or e.shape[0] != len(words):
        raise InvalidArgumentError(
            f"the text encoder returned shape {e.shape} for {len(words)} {what} words"
        )
    n = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.maximum(n, 1e-12)


def default_n_components(dim: int) -> int:
    """A third of the dimension (BASIC keeps 250 of CLIP ViT-L's 768)."""
    return max(1, dim // 3)


def text_basis(
    encode_texts: TextEncoder,
    objects: Sequence[str],
    styles: Sequence[str] | None = None,
    *,
    alpha: float = DEFAULT_ALPHA,
    n_components: int | None = None,
) -> TextBasis:
    """The text centre and (when ``styles`` is given) the contrastive-PCA projection.

    ``n_components`` defaults to :func:`default_n_components`; fewer are kept when ``C`` has
    fewer positive eigenvalues. ``alpha`` in [0, 1)."""
    alpha = float(alpha)
    if not 0.0 <= alpha < 1.0:
        raise InvalidArgumentError(f"alpha must be in [0, 1), got {alpha}")
    a = _embed(encode_texts, objects, "object")
    mu_t = a.mean(axis=0)
    if styles is None:
        return TextBasis(text_mean=mu_t)
    b = _embed(encode_texts, styles, "style")
    if b.shape[1] != a.shape[1]:
        raise InvalidArgumentError("object and style embeddings have different dimensions")
    ac, bc = a - mu_t, b - mu_t
    c = (1.0 - alpha) * (ac.T @ ac) / (len(a) - 1) - alpha * (bc.T @ bc) / (len(b) - 1)
    w, v = np.linalg.eigh((c + c.T) / 2)
    order = np.argsort(w)[::-1]
    w, v = w[order], v[:, order]
    k = default_n_components(a.shape[1]) if n_components is None else int(n_components)
    if k < 1:
        raise InvalidArgumentError(f"n_components must be >= 1, got {k}")
    k = min(k, int((w > 0).sum()))
    if k == 0:
        raise InvalidArgumentError(
            "the contrastive scatter has no positive eigenvalue: lower alpha or widen the "
            "object word list"
        )
    comps = v[:, :k].T.copy()
    return TextBasis(text_mean=mu_t, components=comps, eigenvalues=w[:k].copy())


@dataclass
class TextBasisCache:
    """Memoizes :func:`text_basis` by (model key, word lists, alpha, n_components).

    One instance per process (a server keeps one); thread-safe; the model key must change with
    the weights (e.g. ``encoder.info.fingerprint``)."""

    max_entries: int = 32
    _store: dict[tuple, TextBasis] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(
        self,
        model_key: str,
        encode_texts: TextEncoder,
        objects: Sequence[str],
        styles: Sequence[str] | None = None,
        *,
        alpha: float = DEFAULT_ALPHA,
        n_components: int | None = None,
    ) -> TextBasis:
        key = (
            str(model_key), tuple(objects), None if styles is None else tuple(styles),
            float(alpha), n_components,
        )
        with self._lock:
            hit = self._store.get(key)
        if hit is not None:
            return hit
        basis = text_basis(encode_texts, objects, styles, alpha=alpha, n_components=n_components)
        with self._lock:
            if len(self._store) >= self.max_entries:
                self._store.pop(next(iter(self._store)))
            self._store[key] = basis
        return basis
