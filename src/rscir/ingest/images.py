"""Decoding one archive unit into an RGB image and what it says of itself (size, where, when).

JPEG, PNG, BMP and WebP through Pillow; TIFF/GeoTIFF and JPEG 2000 through rasterio (any band
count and dtype, bands and 8-bit scaling by :class:`~.sensors.RasterRead`; footprint, CRS and
acquisition time when the file has them); chips and band stacks through
:func:`~.rasters.read_unit`. Every failure is an :class:`~rscir.errors.ImageDecodeError` whose
message is the reason, so one bad file never stops an ingestion.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImageDecodeError
from .rasters import RASTERIO_EXTS, Decoded, RasterCache, oversize_message, read_unit
from .sensors import RasterRead
from .units import ImageMeta, UnitTask

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".jp2"})
TIFF_EXTS = RASTERIO_EXTS  # read with rasterio: any band count and dtype, georeferenced
DEFAULT_MAX_PIXELS = 100_000_000  # ~10k × 10k; larger files are treated as decompression bombs


def _load_raster(path: Path, max_pixels: int, read: RasterRead | None
                 ) -> tuple[Image.Image, ImageMeta]:
    cache = RasterCache(max_open=1, max_pixels=max_pixels)
    try:
        d = read_unit(path.parent, UnitTask((path.name,), None, False),
                      replace(read or RasterRead(), all_bands=False), cache, max_pixels)
    finally:
        cache.close()
    assert d.rgb is not None
    return Image.fromarray(d.rgb), d.meta


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS,
               read: RasterRead | None = None) -> tuple[Image.Image, ImageMeta]:
    """Decode one file to an RGB PIL image, or raise :class:`ImageDecodeError` with the reason.
    ``read`` chooses bands and scaling of rasters (TIFF, JPEG 2000)."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ImageDecodeError(f"cannot read file: {e.strerror or e}") from e
    if size == 0:
        raise ImageDecodeError("empty file")
    if p.suffix.lower() in TIFF_EXTS:
        return _load_raster(p, max_pixels, read)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageDecodeError(oversize_message(w, h, max_pixels))
                im.load()  # forces a full decode: truncated files fail here
                rgb = im.convert("RGB")
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"oversized image (decompression bomb): {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError("not an image (unidentified format)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from e
    return rgb, ImageMeta(w, h)


def rgb_bands(image: Image.Image) -> np.ndarray:
    """An RGB image as an all-band read of it: (3, H, W) float32 in [0, 1]."""
    return np.asarray(image.convert("RGB"), np.float32).transpose(2, 0, 1) / np.float32(255.0)


def decode_unit(root: Path, task: UnitTask, read: RasterRead, cache: RasterCache,
                max_pixels: int) -> tuple[Image.Image | np.ndarray | None, ImageMeta, float]:
    """(RGB image, metadata, share of valid pixels) of one work unit. A whole ordinary image
    file decodes exactly as :func:`load_image` does; rasters, chips and band stacks are read
    through ``cache``. The image is None for a chip whose valid share is under
    ``read.min_valid`` (skipped as empty). With ``read.all_bands`` the image is every band,
    (C, H, W) float32 reflectance with NaN where masked (:meth:`RasterRead.to_reflectance`;
    a JPEG/PNG tile is its 3 bands / 255)."""
    if task.window is None and not task.stacked and "://" not in task.files[0] and (
            Path(task.files[0]).suffix.lower() not in TIFF_EXTS):
        img, meta = load_image(root / task.files[0], max_pixels)
        return (rgb_bands(img) if read.all_bands else img), meta, 1.0
    d: Decoded = read_unit(root, task, read, cache, max_pixels)
    if task.window is not None and d.valid < read.min_valid:
        return None, d.meta, d.valid
    if d.bands is not None:
        return d.bands, d.meta, d.valid
    assert d.rgb is not None
    return Image.fromarray(d.rgb), d.meta, d.valid
