"""The encoder interface every model backend implements (open_clip, rscir-mini, classic, ...).

An encoder maps images and texts into one embedding space and returns L2-normalized float32
arrays. Image preprocessing is a separate, picklable callable so that decoding and resizing can
run in DataLoader worker processes while the model stays in the main process.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InvalidArgumentError

ImageLike = Image.Image | np.ndarray


@dataclass(frozen=True)
class ModelInfo:
    """What identifies a model's embedding space; stored in an index manifest."""

    name: str
    arch: str
    fingerprint: str
    dim: int
    backend: str = "open_clip"
    source: str | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def same_space(self, other: ModelInfo) -> bool:
        """Two models embed compatibly only when architecture and weights are the same."""
        return (
            self.arch == other.arch
            and self.fingerprint == other.fingerprint
            and self.dim == other.dim
            and self.backend == other.backend
        )


@dataclass(frozen=True)
class BandLayout:
    """The bands an all-band encoder describes (``wants_bands == "all"``): how many, and the
    0-based positions of red and NIR when known (NDVI). Learnt from the archive before the
    store is created, because the descriptor's dimension depends on it."""

    count: int
    red: int | None = None
    nir: int | None = None

    @classmethod
    def of(cls, info: ModelInfo) -> BandLayout | None:
        """The layout a model's identity records (all-band models), else None."""
        d = info.preprocessing.get("layout")
        if not isinstance(d, dict):
            return None
        return cls(int(d["count"]), d.get("red"), d.get("nir"))


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(n, 1e-12)


def to_pil_rgb(image: ImageLike) -> Image.Image:
    """Accept PIL images or HxW / HxWxC uint8 (or float in [0,1]) arrays."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise InvalidArgumentError(f"expected an HxW or HxWxC image array, got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return Image.fromarray(arr[..., :3])


def fingerprint_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


class Encoder(ABC):
    """Frozen image/text encoder producing L2-normalized float32 embeddings."""

    info: ModelInfo
    batch_size: int = 64
    text_cache: Any = None  # a .text_cache.TextEmbeddingCache where the backend keeps one
    # "rgb": ``preprocess`` takes an 8-bit RGB PIL image (the composite of a raster);
    # "all": it takes every band, (C, H, W) float32 reflectance in [0, 1], NaN where masked
    wants_bands: str = "rgb"

    def for_bands(self, layout: BandLayout) -> Encoder:
        """This model set up for ``layout`` (all-band encoders); RGB encoders are unchanged."""
        return self

    def probe_input(self) -> Any:
        """A blank input of the kind ``preprocess`` takes (to learn its output layout)."""
        return Image.new("RGB", (64, 64))

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    @abstractmethod
    def preprocess(self) -> Callable[[Image.Image], Any]:
        """Picklable PIL -> model-input transform (runs in loader workers)."""

    @abstractmethod
    def encode_preprocessed(self, batch: Any) -> np.ndarray:
        """Embed a collated batch of ``preprocess`` outputs; returns (B, dim) normalized float32."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts; returns (T, dim) L2-normalized float32."""

    def collate(self, items: list[Any]) -> Any:
        """Stack preprocessed items into a batch (torch tensors by default)."""
        import torch

        return torch.stack(items) if items and isinstance(items[0], torch.Tensor) else items

    def warm_up(self) -> None:
        """Load whatever loads lazily and run the image tower once, so that the first query
        pays no start-up cost (``rscir serve`` calls this before it answers). Backends with a
        lazily loaded text tower load it too."""
        self.encode_images([np.full((64, 64, 3), 127, np.uint8)])

    def encode_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Embed PIL images or arrays, batched; returns (B, dim) L2-normalized float32."""
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = [self.preprocess(to_pil_rgb(im)) for im in images[i : i + self.batch_size]]
            out.append(self.encode_preprocessed(self.collate(chunk)))
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(out, axis=0)
