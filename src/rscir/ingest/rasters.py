"""Reading pixels of rasters: windowed reads of scenes, band stacks, valid-pixel masks.

GeoTIFF/COG, JPEG 2000, VRT and remote hrefs go through rasterio with windowed reads, so a chip
costs the blocks it touches and memory stays bounded whatever the scene size (GDAL's block cache
is capped at :data:`GDAL_CACHE_MB`). Formats without random access (JPEG, PNG, BMP, WebP) are
decoded once with Pillow and sliced. A :class:`RasterCache` keeps a few rasters open per
decoding process, so consecutive chips of one scene reuse the open file.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageDecodeError
from .geo import Footprints, crs_name, tag_datetime, window_footprints
from .sensors import RasterRead
from .units import ImageMeta, UnitTask, Window

RASTERIO_EXTS = frozenset({".tif", ".tiff", ".jp2", ".vrt", ".img"})
GDAL_CACHE_MB = 256  # GDAL block cache per decoding process


def uses_rasterio(href: str) -> bool:
    return "://" in href or Path(href.split("?", 1)[0]).suffix.lower() in RASTERIO_EXTS


def oversize_message(w: int, h: int, max_pixels: int) -> str:
    return (f"oversized image {w}x{h} > {max_pixels} pixels; index it as chips with "
            "--chip-size N (e.g. --chip-size 256), which reads it window by window")


@dataclass
class Raster:
    """An open raster: its header, and windowed reads (padded past the edges)."""

    href: str
    width: int
    height: int
    count: int
    dtype: str
    transform: Any
    crs: Any
    descriptions: tuple[str | None, ...]
    colorinterp: tuple[str, ...]
    nodata: float | None
    datetime: str | None
    per_dataset_mask: bool
    ds: Any = None  # rasterio dataset, or None for a decoded Pillow image
    pixels: np.ndarray | None = None  # (C, H, W) for Pillow-decoded images

    def read(self, indexes: list[int], window: Window | None,
             out_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(bands (len(indexes), h, w), inside (h, w) bool): pixels of ``window`` (None: the
        whole raster), zero outside the raster; ``out_shape`` resamples (bilinear)."""
        if window is None:
            window = (0, 0, self.width, self.height)
            if out_shape is not None:
                h0, w0 = out_shape
                if (h0, w0) == (self.height, self.width):
                    out_shape = None
        c, r, w, h = window
        c0, r0 = max(c, 0), max(r, 0)
        c1, r1 = min(c + w, self.width), min(r + h, self.height)
        if out_shape is not None:
            return self._read_resampled(indexes, window, out_shape)
        out = np.zeros((len(indexes), h, w), self._np_dtype())
        inside = np.zeros((h, w), bool)
        if c1 > c0 and r1 > r0:
            if self.ds is not None:
                from rasterio.windows import Window as RWindow

                data = self.ds.read(indexes, window=RWindow(c0, r0, c1 - c0, r1 - r0))
            else:
                assert self.pixels is not None
                data = self.pixels[np.asarray(indexes) - 1, r0:r1, c0:c1]
            out[:, r0 - r : r1 - r, c0 - c : c1 - c] = data
            inside[r0 - r : r1 - r, c0 - c : c1 - c] = True
        return out, inside

    def _read_resampled(self, indexes: list[int], window: Window, out_shape: tuple[int, int]
                        ) -> tuple[np.ndarray, np.ndarray]:
        from rasterio.enums import Resampling
        from rasterio.windows import Window as RWindow

        if self.ds is None:
            raise ImageDecodeError(f"{self.href}: band files of another size must be GeoTIFFs")
        c, r, w, h = window
        outside = c < 0 or r < 0 or c + w > self.width or r + h > self.height
        data = self.ds.read(indexes, window=RWindow(c, r, w, h), out_shape=(len(indexes),
                            *out_shape), resampling=Resampling.bilinear, boundless=outside,
                            **({"fill_value": 0} if outside else {}))
        return data, np.ones(out_shape, bool)

    def mask(self, window: Window | None) -> np.ndarray | None:
        """The dataset's own mask (alpha band, internal mask) for ``window``, when it has one."""
        if not self.per_dataset_mask or self.ds is None:
            return None
        from rasterio.windows import Window as RWindow

        c, r, w, h = window or (0, 0, self.width, self.height)
        c0, r0 = max(c, 0), max(r, 0)
        c1, r1 = min(c + w, self.width), min(r + h, self.height)
        out = np.zeros((h, w), bool)
        if c1 > c0 and r1 > r0:
            m = self.ds.read_masks(1, window=RWindow(c0, r0, c1 - c0, r1 - r0))
            out[r0 - r : r1 - r, c0 - c : c1 - c] = m > 0
        return out

    def _np_dtype(self) -> Any:
        return np.dtype(self.dtype)

    def footprints(self, windows: np.ndarray) -> Footprints:
        return window_footprints(self.transform, self.crs, windows, (self.height, self.width))

    def close(self) -> None:
        if self.ds is not None:
            self.ds.close()
            self.ds = None
        self.pixels = None


def _open_rasterio(href: str) -> Raster:
    import rasterio
    from rasterio.enums import MaskFlags
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(href)
    except (RasterioIOError, OSError, ValueError) as e:
        raise ImageDecodeError(f"unreadable raster: {e}") from e
    flags = ds.mask_flag_enums[0] if ds.count else ()
    per_dataset = (MaskFlags.per_dataset in flags or MaskFlags.alpha in flags) and (
        MaskFlags.nodata not in flags)
    try:
        tags = dict(ds.tags())
    except Exception:  # noqa: BLE001 - metadata is optional
        tags = {}
    georef = ds.crs is not None and not ds.transform.is_identity
    return Raster(
        href=href, width=ds.width, height=ds.height, count=ds.count, dtype=ds.dtypes[0],
        transform=ds.transform if georef else None, crs=ds.crs if georef else None,
        descriptions=tuple(ds.descriptions), colorinterp=tuple(c.name for c in ds.colorinterp),
        nodata=ds.nodata, datetime=tag_datetime(tags), per_dataset_mask=per_dataset, ds=ds)


def _open_pillow(href: str, max_pixels: int) -> Raster:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(href) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageDecodeError(
                        f"oversized image {w}x{h} > {max_pixels} pixels: a {Path(href).suffix} "
                        "file is decoded whole; convert it to a tiled GeoTIFF to chip it")
                rgb = np.asarray(im.convert("RGB"))
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"corrupt or unreadable image: {e}") from e
    return Raster(href=href, width=w, height=h, count=3, dtype="uint8", transform=None,
                  crs=None, descriptions=(None, None, None),
                  colorinterp=("red", "green", "blue"), nodata=None, datetime=None,
                  per_dataset_mask=False, pixels=np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def probe_size(href: str) -> tuple[int, int]:
    """(width, height) from the header only (rasterio or Pillow, whichever reads the format)."""
    if uses_rasterio(href):
        r = _open_rasterio(href)
        r.close()
        return r.width, r.height
    from PIL import Image

    try:
        with Image.open(href) as im:
            return im.size
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"not a readable image: {e}") from e


class RasterCache:
    """A few open rasters per process (an LRU), inside a bounded GDAL block cache."""

    def __init__(self, max_open: int = 4, max_pixels: int = 10**12) -> None:
        self.max_open = max_open
        self.max_pixels = max_pixels
        self._open: OrderedDict[str, Raster] = OrderedDict()
        self._env: Any = None

    def get(self, href: str) -> Raster:
        r = self._open.get(href)
        if r is not None:
            self._open.move_to_end(href)
            return r
        if self._env is None:
            import rasterio

            self._env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 1024 * 1024,
                                     GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR")
            self._env.__enter__()
        r = _open_rasterio(href) if uses_rasterio(href) else _open_pillow(href, self.max_pixels)
        self._open[href] = r
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return r

    def close(self) -> None:
        for r in self._open.values():
            r.close()
        self._open.clear()
        if self._env is not None:
            self._env.__exit__(None, None, None)
            self._env = None

    def __getstate__(self) -> dict[str, Any]:  # travels to worker processes empty
        return {"max_open": self.max_open, "max_pixels": self.max_pixels}

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__init__(d["max_open"], d["max_pixels"])  # type: ignore[misc]


def href_of(root: Path, rel: str) -> str:
    return rel if "://" in rel else os.fspath(root / rel)


@dataclass(frozen=True)
class Decoded:
    """A decoded unit: RGB pixels (H, W, 3) uint8 — or, for an all-band read, every band as
    float32 reflectance (C, H, W) in [0, 1] with NaN where masked — the share of valid pixels,
    its metadata and (all-band reads) the bands' names where the file gives them."""

    rgb: np.ndarray | None
    valid: float
    meta: ImageMeta
    bands: np.ndarray | None = None
    band_names: tuple[str | None, ...] = ()


def read_bands(root: Path, task: UnitTask, read: RasterRead, cache: RasterCache,
               max_pixels: int) -> tuple[np.ndarray, np.ndarray, Raster, tuple[str | None, ...]]:
    """(raw bands (C, H, W), inside (H, W), the reference raster, band names) of one unit:
    the RGB composite's bands, or every band when ``read.all_bands``. Band stacks (one file per
    band) are read on the finest file's grid, coarser files resampled (bilinear) to it — the
    same reads for the composite and for all-band encoders."""
    rasters = [cache.get(href_of(root, f)) for f in dict.fromkeys(task.files)]
    ref = max(rasters, key=lambda x: x.width)  # band stacks: the finest grid is the reference
    win = task.window
    w, h = (win[2], win[3]) if win is not None else (ref.width, ref.height)
    if win is None and w * h > max_pixels:
        raise ImageDecodeError(oversize_message(w, h, max_pixels))
    names: tuple[str | None, ...] = ()
    if task.stacked:
        planes, inside = [], None
        for f in task.files:
            r = cache.get(href_of(root, f))
            same = r.width == ref.width and r.height == ref.height
            data, ins = r.read([1], _scaled(win, ref, r), None if same else (h, w))
            planes.append(data[0])
            inside = ins if inside is None else inside & ins
        if read.all_bands:
            bands = np.stack(planes)
        else:
            bands = np.stack(planes if len(planes) >= 3 else planes * 3)[:3]
        assert inside is not None
    else:
        if read.all_bands:
            idx = read.all_band_indexes(ref.count, ref.colorinterp)
            names = tuple(ref.descriptions[i - 1] if i <= len(ref.descriptions) else None
                          for i in idx)
        else:
            idx = read.band_indexes(ref.count, ref.descriptions, ref.colorinterp)
        bands, inside = ref.read(idx, win)
    return bands, inside, ref, names


def read_unit(root: Path, task: UnitTask, read: RasterRead, cache: RasterCache,
              max_pixels: int) -> Decoded:
    """Pixels and metadata of one unit (a whole raster, a chip window, or a band stack)."""
    bands, inside, ref, names = read_bands(root, task, read, cache, max_pixels)
    win = task.window
    h, w = inside.shape
    nodata = read.nodata_value(ref.nodata)
    valid = inside.copy()
    if np.issubdtype(bands.dtype, np.floating):
        valid &= np.isfinite(bands).all(axis=0)
    if nodata is not None:
        valid &= ~(bands == nodata).all(axis=0)
    m = ref.mask(win)
    if m is not None:
        valid &= m
    share = float(valid.mean()) if valid.size else 0.0
    if nodata is None and m is None:  # no nodata declared: 0 in every band is empty too
        share = float((valid & (bands != 0).any(axis=0)).mean()) if valid.size else 0.0
    fp = ref.footprints(np.array([win or (0, 0, ref.width, ref.height)]))
    meta = ImageMeta(int(w), int(h), float(fp.lon[0]), float(fp.lat[0]), fp.crs,
                     fp.wgs84[0], fp.native[0], ref.datetime)
    if read.all_bands:
        return Decoded(None, share, meta, read.to_reflectance(bands, valid), names)
    rgb = read.to_uint8(bands, valid if not valid.all() else None)
    return Decoded(np.ascontiguousarray(rgb.transpose(1, 2, 0)), share, meta)


def _scaled(win: Window | None, ref: Raster, other: Raster) -> Window | None:
    """``win`` (pixels of ``ref``) in pixels of ``other``, which covers the same extent."""
    if win is None:
        return None
    if other.width == ref.width and other.height == ref.height:
        return win
    sx, sy = other.width / ref.width, other.height / ref.height
    c, r, w, h = win
    return (int(round(c * sx)), int(round(r * sy)), max(1, int(round(w * sx))),
            max(1, int(round(h * sy))))


__all__ = ["Decoded", "Raster", "RasterCache", "crs_name", "probe_size", "read_bands",
           "read_unit"]
