"""The classic encoder: a hand-crafted colour/texture descriptor (:mod:`rscir.features`),
standardized and L2-normalized, with no model weights and no text tower.

It makes image-to-image retrieval and hashing work on a machine with no weights at all (the
setting of the hashing literature on RS retrieval). Standardization uses per-dimension mean/std
shipped in ``rscir/weights/classic-handcrafted-v1.npz``: fitted without labels on the 4,400
images of UCM-16 + RSSCN7 (std floored at 5% of the median std, so bins that never fire there
cannot explode); z-scoring raises UCM-16 image-to-image mAP from 0.23 (raw block-normalized
features) to 0.32, RSSCN7 from 0.34 to 0.44. A user ``.npz`` with ``mean`` and ``std`` can be
given instead (``--checkpoint``), e.g. fitted on one's own archive.

``classic-ms`` (:class:`ClassicMSEncoder`) describes every band of a multispectral item
(:mod:`rscir.features.multispectral`): ingestion hands it all bands as reflectance instead of
the RGB composite (``wants_bands = "all"``). Its dimension depends on the band count, learnt
from the archive, which is part of the model's identity: a 12-band store and an RGB store are
different spaces. No shipped statistics (they would depend on the bands): descriptors are
L2-normalized as they are, or standardized with a ``--checkpoint`` .npz of ``mean``/``std``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..errors import ImageDecodeError, ModelUnavailableError
from .base import BandLayout, Encoder, ImageLike, ModelInfo, l2_normalize

if TYPE_CHECKING:
    from ..features.handcrafted import HandcraftedDescriptor
    from ..features.multispectral import MultispectralDescriptor
    from .registry import LoadOptions, ModelRegistry, ModelSpec

ARCH = "handcrafted-v1"
MS_ARCH = "handcrafted-ms-v1"
STATS_FILE = "classic-handcrafted-v1.npz"


class NoTextTowerError(ModelUnavailableError):
    """The model embeds images only; composed or text queries need a vision-language model."""


@dataclass(frozen=True)
class DescribeImage:
    """Picklable PIL -> (D,) float32 raw descriptor; runs in DataLoader workers."""

    descriptor: HandcraftedDescriptor

    def __call__(self, image: Image.Image) -> np.ndarray:
        from ..features.handcrafted import to_working_array  # scikit-image: loaded on use

        arr = to_working_array(image, self.descriptor.size)
        return self.descriptor.from_arrays(arr[None])[0]


def as_bands(image: ImageLike) -> np.ndarray:
    """An all-band encoder's input as (C, H, W) float reflectance: float arrays are band
    stacks (C, H, W) in [0, 1] (NaN: masked) as ingestion makes them; PIL images and uint8
    arrays (H, W[, C], channels last) are 8-bit images, scaled by 1/255."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0
        return arr
    a = np.asarray(image)
    if a.dtype == np.uint8:
        a = a[..., None] if a.ndim == 2 else a
        return a.transpose(2, 0, 1).astype(np.float32) / 255.0
    if a.ndim == 2:
        return a[None].astype(np.float32)
    if a.ndim != 3:
        raise ImageDecodeError(f"expected a (C, H, W) band array, got shape {a.shape}")
    return a.astype(np.float32)


@dataclass(frozen=True)
class DescribeBands:
    """Picklable all-band input -> (D,) float32 raw descriptor; runs in decode workers."""

    descriptor: MultispectralDescriptor

    def __call__(self, image: ImageLike) -> np.ndarray:
        planes, weights = self.descriptor.working(as_bands(image))
        return self.descriptor.from_working(planes[None], weights[None])[0]


def load_stats(path: str | Path | None, dim: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(mean, std, source) for standardization; the shipped file when ``path`` is None."""
    try:
        if path is None:
            ref = resources.files("rscir") / "weights" / STATS_FILE
            with resources.as_file(ref) as p, np.load(p) as z:
                mean, std = z["mean"], z["std"]
            source = f"rscir/weights/{STATS_FILE}"
        else:
            with np.load(path) as z:
                mean, std = z["mean"], z["std"]
            source = str(path)
    except (OSError, KeyError, ValueError, ModuleNotFoundError) as e:
        raise ModelUnavailableError(
            f"classic encoder standardization stats unreadable ({path or STATS_FILE}): {e}; "
            "pass an .npz with 'mean' and 'std' arrays via --checkpoint"
        ) from e
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if mean.shape != (dim,) or std.shape != (dim,):
        raise ModelUnavailableError(
            f"classic stats have shapes {mean.shape}/{std.shape}, expected ({dim},) for {ARCH}"
        )
    return mean, np.where(std > 1e-8, std, 1.0), source


class ClassicEncoder(Encoder):
    """Standardized, L2-normalized hand-crafted descriptors; images only."""

    has_text = False

    def __init__(
        self,
        name: str = "classic",
        *,
        stats: str | Path | None = None,
        descriptor: HandcraftedDescriptor | None = None,
        batch_size: int = 64,
    ) -> None:
        from ..features.handcrafted import HandcraftedDescriptor  # scikit-image: loaded on use

        self.descriptor = descriptor or HandcraftedDescriptor()
        self.batch_size = batch_size
        self.mean, self.std, source = load_stats(stats, self.descriptor.dim)
        cfg = self.descriptor.config()
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
        h.update(self.mean.tobytes())
        h.update(self.std.tobytes())
        self.info = ModelInfo(
            name=name,
            arch=ARCH,
            fingerprint="sha256:" + h.hexdigest(),
            dim=self.descriptor.dim,
            backend="classic",
            source=source,
            preprocessing={"descriptor": cfg, "text": False},
        )
        self._preprocess = DescribeImage(self.descriptor)

    @property
    def preprocess(self) -> Callable[[Image.Image], Any]:
        return self._preprocess

    def collate(self, items: list[Any]) -> Any:
        return np.stack(items) if items else np.zeros((0, self.dim), np.float32)

    def standardize(self, raw: np.ndarray) -> np.ndarray:
        """Raw descriptors (B, D) -> z-scored, L2-normalized float32."""
        z = (np.asarray(raw, np.float64) - self.mean) / self.std
        return l2_normalize(z.astype(np.float32))

    def encode_preprocessed(self, batch: Any) -> np.ndarray:
        return self.standardize(np.asarray(batch))

    def encode_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Batched descriptor (one FFT batch per chunk), then standardization."""
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.standardize(self.descriptor(images, batch_size=self.batch_size))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise NoTextTowerError(
            f"model {self.info.name!r} is a hand-crafted image descriptor with no text tower: "
            "it supports image-only queries (method 'image'); use a vision-language model "
            "(e.g. rscir-mini) for text or composed queries"
        )


class ClassicMSEncoder(ClassicEncoder):
    """All-band hand-crafted descriptors (see module docstring); images only.

    Built for 3 bands (RGB tiles) until :meth:`for_bands` sets it up for an archive's
    layout, which ingestion does before the store is created."""

    wants_bands = "all"

    def __init__(
        self,
        name: str = "classic-ms",
        *,
        layout: BandLayout | None = None,
        stats: str | Path | None = None,
        batch_size: int = 64,
    ) -> None:
        from ..features.multispectral import MultispectralDescriptor  # scikit-image: on use

        self.layout = layout or BandLayout(3)
        self.stats_path = stats
        self.ms = MultispectralDescriptor(self.layout.count, self.layout.red, self.layout.nir)
        self.batch_size = batch_size
        cfg = self.ms.config()
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
        source = None
        if stats is not None:
            self.mean, self.std, source = load_stats(stats, self.ms.dim)
            h.update(self.mean.tobytes())
            h.update(self.std.tobytes())
        else:
            self.mean, self.std = np.zeros(self.ms.dim), np.ones(self.ms.dim)
        self.info = ModelInfo(
            name=name,
            arch=MS_ARCH,
            fingerprint="sha256:" + h.hexdigest(),
            dim=self.ms.dim,
            backend="classic",
            source=source,
            preprocessing={"descriptor": cfg, "bands": "all", "band_count": self.layout.count,
                           "layout": asdict(self.layout), "text": False},
        )
        self._ms_preprocess = DescribeBands(self.ms)

    @property
    def preprocess(self) -> Callable[[Any], Any]:
        return self._ms_preprocess

    def for_bands(self, layout: BandLayout) -> ClassicMSEncoder:
        if layout == self.layout:
            return self
        return ClassicMSEncoder(self.info.name, layout=layout, stats=self.stats_path,
                                batch_size=self.batch_size)

    def probe_input(self) -> Any:
        return np.zeros((self.layout.count, 64, 64), np.float32)

    def warm_up(self) -> None:
        self.encode_images([self.probe_input()])

    def standardize(self, raw: np.ndarray) -> np.ndarray:
        """Raw descriptors (B, D) -> (z-scored when stats were given) L2-normalized float32."""
        if self.stats_path is None:
            return l2_normalize(np.asarray(raw, np.float32))
        return super().standardize(raw)

    def encode_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Band stacks (C, H, W) float, or 8-bit images (3 bands) when the model has 3."""
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.standardize(self.ms([as_bands(im) for im in images],
                                        batch_size=self.batch_size))


def _load_classic(spec: ModelSpec, opts: LoadOptions) -> Encoder:
    if spec.options.get("bands") == "all":
        return ClassicMSEncoder(spec.name, stats=spec.checkpoint, batch_size=opts.batch_size)
    return ClassicEncoder(spec.name, stats=spec.checkpoint, batch_size=opts.batch_size)


def register(registry: ModelRegistry) -> None:
    """Add the classic (colour/texture) backend and its spec."""
    from .registry import ModelSpec

    registry.register_backend("classic", _load_classic)
    registry.register(
        ModelSpec(
            "classic",
            ARCH,
            backend="classic",
            description="hand-crafted colour + LBP + Gabor descriptor (no weights, images only)",
        )
    )
    registry.register(
        ModelSpec(
            "classic-ms",
            MS_ARCH,
            backend="classic",
            description="hand-crafted descriptor of every band of multispectral items "
            "(per-band statistics + LBP/Gabor; no weights, images only)",
            options={"bands": "all"},
        )
    )
