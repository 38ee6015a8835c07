"""Inference of a ``descriptor`` image tower (the shipped rscir-mini) with numpy, no torch.

The tower is the hand-crafted colour/texture descriptor of :mod:`rscir.features.handcrafted`
followed by a standardization and a 3-layer MLP (:class:`~.towers.DescriptorMLP`). Embedding a
query image needs a few hundred thousand multiply-adds, so importing torch for it (seconds on a
small machine) dominated an image query from outside the archive. Training keeps the torch
module; this reads the same weights file and computes the same function (tested against it).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InvalidArgumentError

PREFIX = "net."  # ImageTower keeps the DescriptorMLP as .net, whose Sequential is .net again


def descriptor_from_config(config: dict[str, Any] | None) -> Any:
    """The :class:`~rscir.features.handcrafted.HandcraftedDescriptor` of a tower configuration
    (JSON lists turned back into the tuples the descriptor takes)."""
    from ..features.handcrafted import HandcraftedDescriptor

    cfg = dict(config or {})
    if "hsv_bins" in cfg:
        cfg["hue_bins"], cfg["sat_bins"], cfg["val_bins"] = cfg.pop("hsv_bins")
    if "lbp_scales" in cfg:
        cfg["lbp_scales"] = tuple(tuple(s) for s in cfg["lbp_scales"])
    if "gabor_frequencies" in cfg:
        cfg["gabor_frequencies"] = tuple(cfg["gabor_frequencies"])
    return HandcraftedDescriptor(**cfg)


class DescriptorFeatures:
    """Picklable PIL -> raw descriptor (float32 vector): the ``preprocess`` of a descriptor
    tower, run in loader workers. Same values as ``DescriptorInput.load``."""

    def __init__(self, descriptor_config: dict[str, Any] | None = None) -> None:
        self.descriptor_config = dict(descriptor_config or {})
        self._descriptor: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"descriptor_config": self.descriptor_config, "_descriptor": None}

    def __call__(self, pil: Image.Image) -> np.ndarray:
        if self._descriptor is None:
            self._descriptor = descriptor_from_config(self.descriptor_config)
        return np.asarray(self._descriptor([pil])[0], np.float32)


class NumpyDescriptorMLP:
    """``(x - mean) / std``, then Linear-GELU-Linear-GELU-Linear, then L2 normalization."""

    def __init__(self, weights: str | os.PathLike[str], embed_dim: int | None = None) -> None:
        """Read the weights (KeyError for a missing tensor, ValueError for shapes that do not
        chain or do not end in ``embed_dim``)."""
        from safetensors.numpy import load_file
        from scipy.special import erf

        sd = load_file(str(weights))
        self._erf = erf
        self.mean = sd[PREFIX + "mean"].astype(np.float32)
        self.std = sd[PREFIX + "std"].astype(np.float32)
        self.layers = [(np.ascontiguousarray(sd[f"{PREFIX}net.{i}.weight"].T, np.float32),
                        sd[f"{PREFIX}net.{i}.bias"].astype(np.float32)) for i in (0, 3, 6)]
        width = self.mean.shape[0]
        for w, b in self.layers:
            if self.std.shape != self.mean.shape or w.shape[0] != width or b.shape != w.shape[1:]:
                raise InvalidArgumentError(f"layer shapes do not chain: {w.shape} after width {width}")
            width = w.shape[1]
        if embed_dim is not None and width != embed_dim:
            raise InvalidArgumentError(f"the tower embeds in {width} dimensions, not {embed_dim}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h = (np.asarray(x, np.float32) - self.mean) / self.std
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < len(self.layers) - 1:  # exact GELU, as torch.nn.GELU()
                h = h * np.float32(0.5) * (np.float32(1.0) + self._erf(h * np.float32(0.5**0.5)))
        n = np.linalg.norm(h, axis=-1, keepdims=True)
        return (h / np.maximum(n, 1e-12)).astype(np.float32, copy=False)
