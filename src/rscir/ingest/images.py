"""Decoding one archive file into an RGB image and what it says of itself (size, where).

JPEG, PNG, BMP and WebP through Pillow; TIFF and GeoTIFF through rasterio (any band count and
dtype, stretched to 8 bit; the footprint centre as lon/lat). Every failure is an
:class:`~rscir.errors.ImageDecodeError` whose message is the reason, so one bad file never
stops an ingestion.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImageDecodeError

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})
TIFF_EXTS = frozenset({".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 100_000_000  # ~10k × 10k; larger files are treated as decompression bombs


@dataclass(frozen=True)
class ImageMeta:
    width: int
    height: int
    lon: float = float("nan")
    lat: float = float("nan")


def _scale_to_uint8(bands: np.ndarray) -> np.ndarray:
    """(C,H,W) any dtype → uint8 with a per-band 2–98 percentile stretch (uint8 is kept)."""
    if bands.dtype == np.uint8:
        return bands
    b = bands.astype(np.float64)
    out = np.empty(b.shape, np.uint8)
    for i in range(b.shape[0]):
        finite = b[i][np.isfinite(b[i])]
        lo, hi = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
        if hi <= lo:
            hi = lo + 1.0
        out[i] = np.clip((np.nan_to_num(b[i], nan=lo) - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    return out


def _load_tiff(path: Path, max_pixels: int) -> tuple[Image.Image, ImageMeta]:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    from rasterio.warp import transform as warp_transform

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                w, h = ds.width, ds.height
                if w * h > max_pixels:
                    raise ImageDecodeError(f"oversized image {w}x{h} > {max_pixels} pixels")
                ci = [c.name.lower() for c in ds.colorinterp]
                if all(c in ci for c in ("red", "green", "blue")):
                    idx = [ci.index("red") + 1, ci.index("green") + 1, ci.index("blue") + 1]
                elif ds.count >= 3:
                    idx = [1, 2, 3]
                else:
                    idx = [1, 1, 1]
                bands = ds.read(idx)
                lon = lat = float("nan")
                if ds.crs is not None and not ds.transform.is_identity:
                    t = ds.transform
                    cx = t.c + t.a * w / 2.0 + t.b * h / 2.0
                    cy = t.f + t.d * w / 2.0 + t.e * h / 2.0
                    xs, ys = warp_transform(ds.crs, "EPSG:4326", [cx], [cy])
                    lon, lat = float(xs[0]), float(ys[0])
    except ImageDecodeError:
        raise
    except (RasterioIOError, OSError, ValueError) as e:
        raise ImageDecodeError(f"unreadable TIFF: {e}") from e
    rgb = np.transpose(_scale_to_uint8(bands), (1, 2, 0))
    return Image.fromarray(np.ascontiguousarray(rgb)), ImageMeta(w, h, lon, lat)


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, ImageMeta]:
    """Decode one file to an RGB PIL image, or raise :class:`ImageDecodeError` with the reason."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ImageDecodeError(f"cannot read file: {e.strerror or e}") from e
    if size == 0:
        raise ImageDecodeError("empty file")
    if p.suffix.lower() in TIFF_EXTS:
        return _load_tiff(p, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageDecodeError(f"oversized image {w}x{h} > {max_pixels} pixels")
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
