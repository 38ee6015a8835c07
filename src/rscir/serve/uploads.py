"""Turning untrusted uploaded bytes into a small RGB image, or a precise HTTP error.

Everything that can be checked from the header is checked before a pixel is decoded:

* format: JPEG (and MPO), PNG, WebP and BMP through Pillow, restricted to those decoders (EPS,
  PS, PDF, GIF, SVG, ... are 415; Pillow's Ghostscript plugin is never reached); TIFF/GeoTIFF
  (recognised by its magic bytes) through GDAL's GTiff driver, as at ingestion;
* size: each side at most ``max_side`` and ``w × h`` at most ``max_pixels`` (413); the long side
  at most ``max_aspect`` times the short one (422: a 20 × 2,500,000 strip is refused at once);
* memory: each decode reserves its estimated peak (pixels × bytes per pixel of its decoder, plus
  JPEG coefficient buffers and TIFF blocks) from a :class:`DecodeBudget` shared by the server,
  so concurrent decodes never hold more than ``decode_memory`` bytes together (a decode that alone
  needs more is 413; one that waits longer than ``wait_s`` is 503).

The decoded image is reduced at once (JPEG: DCT scaling with ``draft``; TIFF: block-by-block box
averaging while reading; the others: ``Image.reduce`` through ``reducing_gap``) so its short side
is ``short_side`` (512) and its long side at most ``long_side`` (4096): the encoder only needs
~224 px, and no float work ever runs on the full-size image.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import math
import tempfile
import threading
import warnings
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from PIL import Image

from ..errors import InvalidArgumentError

MiB = 1024 * 1024
PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")  # TIFF goes to GDAL, by magic bytes
ACCEPTED = "JPEG, PNG, TIFF/GeoTIFF, WebP or BMP"
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
SPOOL_IN_MEMORY = 1 * MiB  # uploads larger than this wait on disk, not in memory

# Bytes per pixel of the image Pillow decodes into, and of what each step adds at full size
# (measured with ru_maxrss on 50 Mpx files; benchmarks/upload_memory.py checks the total).
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_CONVERT_FIRST = {"1": "L", "P": "RGB", "PA": "RGBA", "I;16": "I", "I;16B": "I", "I;16L": "I",
                  "I;16N": "I"}  # modes that Image.reduce/resize do not take
_WEBP_BYTES = 16  # libwebp's canvas, the decoded frame as bytes, the image
_SLACK = 16 * MiB  # decoder state, the reduced image, the encoder's input
GDAL_CACHE = 64 * MiB  # GDAL's block cache, shared by all reads (its default: 5% of RAM)
MMAP_THRESHOLD = 1 * MiB  # glibc: blocks from this size up are mmap'd, so freeing returns them


class UploadError(Exception):
    """Why an upload is refused: ``status`` is 413 (too large), 415 (not an accepted image),
    422 (corrupt, or a shape the server refuses) or 503 (the server is busy; retry)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": "5"} if self.status == 503 else None


@dataclass(frozen=True)
class UploadLimits:
    """What the server accepts, and how much memory decoding may use (all documented in
    ``rscir serve --help``)."""

    max_bytes: int = 20 * MiB
    max_pixels: int = 50_000_000
    max_side: int = 20_000
    max_aspect: float = 20.0
    short_side: int = 512
    long_side: int = 4096
    decode_memory: int = 1024 * MiB
    wait_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_side", "short_side", "long_side",
                     "decode_memory"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be >= 1")
        if not self.max_aspect >= 1:
            raise InvalidArgumentError("max_aspect must be >= 1")
        if not self.wait_s > 0:
            raise InvalidArgumentError("wait_s must be > 0")


class DecodeBudget:
    """Bytes of decode memory shared by concurrent decodes, handed out first come, first served
    (a large decode is not starved by a stream of small ones)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._used = 0
        self._queue: deque[object] = deque()
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        return self._used

    @contextmanager
    def reserve(self, n: int, timeout: float) -> Iterator[None]:
        """Hold ``n`` bytes while the block runs; :class:`UploadError` 413 if ``n`` exceeds the
        whole budget, 503 if it is not free within ``timeout`` seconds."""
        if n > self.total:
            raise UploadError(413, f"decoding this image needs about {n // MiB} MB; the server "
                              f"decodes uploads in at most {self.total // MiB} MB: send a "
                              "smaller image (or a tiled TIFF)")
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            ok = self._cond.wait_for(
                lambda: self._queue[0] is ticket and self._used + n <= self.total, timeout)
            self._queue.remove(ticket)
            if ok:
                self._used += n
            self._cond.notify_all()
        if not ok:
            raise UploadError(503, "the server is busy decoding other uploads: retry in a few "
                              "seconds")
        try:
            yield
        finally:
            with self._cond:
                self._used -= n
                self._cond.notify_all()


def tune_process_memory() -> None:
    """Make memory a decode frees go back to the OS at once; for server processes.

    glibc serves large blocks with ``mmap``, but after the first such block is freed it raises
    that threshold to the block's size (up to 32 MB), and from then on Pillow's 16 MB image
    blocks come from per-thread arenas that keep them: 16 concurrent 50 Mpx PNGs left a server
    1.2 GB larger for good (benchmarks/upload_memory.py). A fixed threshold stops that. Also caps
    GDAL's block cache (see :func:`cap_gdal_cache`). Process-wide, idempotent; a no-op off
    glibc."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    cap_gdal_cache()


def cap_gdal_cache() -> None:
    """Lower GDAL's process-wide block cache to :data:`GDAL_CACHE`: at its default (5% of RAM)
    it keeps the decoded blocks of every TIFF being read, 8 concurrent 50 Mpx uploads took it
    past 1.6 GB. Never raises a lower setting."""
    try:
        from rasterio.env import get_gdal_config, set_gdal_config
    except ImportError:  # pragma: no cover - rasterio is a core dependency
        return
    if int(get_gdal_config("GDAL_CACHEMAX") or 0) > GDAL_CACHE:
        set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE)


def reduced_size(w: int, h: int, short_side: int, long_side: int) -> tuple[int, int]:
    """(w, h) scaled down (never up) so the short side is ``short_side`` unless the long side
    would then exceed ``long_side``."""
    s = min(1.0, short_side / min(w, h), long_side / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s))


def upload_token(fp: IO[bytes]) -> str:
    """SHA-256 of an upload (hex), read in chunks; leaves the file at its start."""
    fp.seek(0)
    digest = hashlib.file_digest(fp, "sha256").hexdigest()  # type: ignore[arg-type]
    fp.seek(0)
    return digest


async def spool_upload(upload: Any, max_bytes: int) -> IO[bytes]:
    """Copy an uploaded part (Starlette ``UploadFile``) into a temporary file that stays in memory
    only while it is small, so uploads waiting for a decode slot do not hold their bytes in RAM;
    413 past ``max_bytes``. The caller closes the file."""
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 - returned
    n = 0
    try:
        while chunk := await upload.read(256 * 1024):
            n += len(chunk)
            if n > max_bytes:
                raise UploadError(413, f"the upload is larger than {max_bytes} bytes")
            out.write(chunk)
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out


@dataclass
class UploadDecoder:
    """Decodes uploads within :class:`UploadLimits`, sharing one :class:`DecodeBudget` between
    the threads that call :meth:`decode`."""

    limits: UploadLimits = field(default_factory=UploadLimits)
    budget: DecodeBudget | None = None

    def __post_init__(self) -> None:
        if self.budget is None:
            self.budget = DecodeBudget(self.limits.decode_memory)

    def decode(self, data: bytes | IO[bytes]) -> Image.Image:
        """A reduced RGB image from uploaded bytes (or a seekable binary file); raises
        :class:`UploadError`."""
        fp: IO[bytes] = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
        fp.seek(0, io.SEEK_END)
        size = fp.tell()
        fp.seek(0)
        if size == 0:
            raise UploadError(422, "the uploaded file is empty")
        if size > self.limits.max_bytes:
            raise UploadError(413, f"the upload is larger than {self.limits.max_bytes} bytes")
        head = fp.read(4)
        fp.seek(0)
        if head in TIFF_MAGIC:
            return self._decode_tiff(fp, size)
        return self._decode_pillow(fp)

    # ------------------------------------------------------------------------- checks
    def check_shape(self, w: int, h: int) -> None:
        """413/422 for a size the server refuses, from the header alone."""
        lim = self.limits
        if w < 1 or h < 1:
            raise UploadError(422, "the image has no pixels")
        if w * h > lim.max_pixels:
            raise UploadError(413, f"the image is {w}×{h} pixels, more than {lim.max_pixels}")
        if max(w, h) > lim.max_aspect * min(w, h):
            raise UploadError(422, f"the image is {w}×{h} pixels: one side is more than "
                              f"{lim.max_aspect:g} times the other; crop it to a less elongated "
                              "region")
        if max(w, h) > lim.max_side:
            raise UploadError(413, f"the image is {w}×{h} pixels; each side may be at most "
                              f"{lim.max_side}")

    def _reserve(self, n: int) -> Any:
        assert self.budget is not None
        return self.budget.reserve(n, self.limits.wait_s)

    # ------------------------------------------------------------------------- Pillow
    def _decode_pillow(self, fp: IO[bytes]) -> Image.Image:
        try:
            with warnings.catch_warnings():
                # our own caps are checked below; Pillow's global one must not override them
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(fp, formats=PILLOW_FORMATS)
        except Image.DecompressionBombError:
            raise UploadError(413, f"the image has more than {self.limits.max_pixels} pixels") \
                from None
        except Image.UnidentifiedImageError:
            raise UploadError(415, f"the upload is not an image the server accepts "
                              f"({ACCEPTED})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise UploadError(422, f"the image header is corrupt: {e}") from None
        with im:
            w, h = im.size
            self.check_shape(w, h)
            tw, th = reduced_size(w, h, self.limits.short_side, self.limits.long_side)
            if im.format in ("JPEG", "MPO"):
                im.draft(None, (tw, th))  # DCT scaling: decode at 1/2, 1/4 or 1/8 of the size
            with self._reserve(_pillow_need(im, w * h, tw * th)):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                        im.load()
                        return _reduce_to_rgb(im, (tw, th))
                except Image.DecompressionBombError:
                    raise UploadError(413, "the image has more than "
                                      f"{self.limits.max_pixels} pixels") from None
                except (OSError, SyntaxError, ValueError, EOFError) as e:
                    raise UploadError(422, f"the image is corrupt or truncated: {e}") from None

    # ------------------------------------------------------------------------- TIFF
    def _decode_tiff(self, fp: IO[bytes], size: int) -> Image.Image:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioError

        cap_gdal_cache()
        data = fp.read()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.MemoryFile(data) as mf, mf.open(driver="GTiff") as ds:
                    self.check_shape(ds.width, ds.height)
                    return self._read_tiff(ds, size)
        except UploadError:
            raise
        except (RasterioError, OSError, ValueError) as e:
            raise UploadError(422, f"the TIFF cannot be decoded: {e}") from None

    def _read_tiff(self, ds: Any, size: int) -> Image.Image:
        """Box-average the (up to) three bands while reading whole block rows, so only one block
        row is ever decoded at full size."""
        from rasterio.windows import Window

        w, h = ds.width, ds.height
        ci = [c.name.lower() for c in ds.colorinterp]
        if all(c in ci for c in ("red", "green", "blue")):
            idx = [ci.index("red") + 1, ci.index("green") + 1, ci.index("blue") + 1]
        elif ds.count >= 3:
            idx = [1, 2, 3]
        else:
            idx = [1, 1, 1]
        tw, th = reduced_size(w, h, self.limits.short_side, self.limits.long_side)
        f = max(1, min(w // tw, h // th))  # integer box factor; Pillow does the rest
        ow, oh = w // f, h // f
        if not all(_real_dtype(d) for d in ds.dtypes):
            raise UploadError(422, f"the TIFF's samples are {ds.dtypes[0]}; the server reads "
                              "integer or real samples only")
        bh = max(int(bs[0]) for bs in ds.block_shapes)
        item = max(np.dtype(d).itemsize for d in ds.dtypes)
        # read whole block rows (each block decoded once), at least 256 rows at a time; rows
        # left over from a read (fewer than f) are carried into the next one
        step = bh * math.ceil(256 / bh) if bh < 256 else bh
        need = (size  # the file's bytes, held by GDAL's memory file
                + 2 * min(step, h) * w * ds.count * item  # GDAL's decoded block row, all bands
                + (min(step, h) + f) * w * 3 * (2 * item + 4)  # our window, carry, float sums
                + 3 * oh * ow * 4 + _SLACK)
        with self._reserve(need):
            out = np.empty((3, oh, ow), np.float32)
            uniq = sorted(set(idx))
            pick = [uniq.index(i) for i in idx]
            carry = np.zeros((3, 0, ow * f), np.dtype(ds.dtypes[uniq[0] - 1]))
            done = 0  # output rows written
            for r0 in range(0, oh * f, step):
                rows = min(step, oh * f - r0)
                win = ds.read(uniq, window=Window(0, r0, ow * f, rows))[pick]
                if carry.shape[1]:
                    win = np.concatenate([carry, win], axis=1)
                n = win.shape[1] // f
                out[:, done : done + n] = win[:, : n * f].reshape(3, n, f, ow, f).mean(
                    axis=(2, 4), dtype=np.float32)
                done += n
                carry = win[:, n * f :]
            rgb = _stretch(out, np.dtype(ds.dtypes[idx[0] - 1]))
        img = Image.fromarray(np.ascontiguousarray(np.transpose(rgb, (1, 2, 0))))
        if img.size != (tw, th):
            img = img.resize((tw, th), Image.Resampling.BICUBIC)
        return img


def _pillow_need(im: Image.Image, px: int, out_px: int) -> int:
    """Estimated peak bytes of decoding ``im`` (``px`` pixels in the file; ``im.size`` is the
    size it decodes to, after a JPEG draft) and reducing it to ``out_px`` pixels."""
    dw, dh = im.size
    if im.format in ("JPEG", "MPO"):
        layers = getattr(im, "layer", None) or [(0, 1, 1, 0)] * len(im.getbands())
        hmax = max(int(lay[1]) for lay in layers)
        vmax = max(int(lay[2]) for lay in layers)
        per_px = sum(int(lay[1]) * int(lay[2]) for lay in layers) / (hmax * vmax)
        # progressive and multi-scan files buffer every DCT coefficient (2 bytes each) at full
        # size; the pixels are decoded at the draft scale, 4 bytes each, then resized
        return int(px * per_px * 2) + 8 * dw * dh + 8 * out_px + _SLACK
    px = dw * dh
    bpp = _PIXEL_BYTES.get(im.mode, 4)
    if im.format == "WEBP":
        bpp = _WEBP_BYTES
    extra = 4 if im.mode in _CONVERT_FIRST else 0
    if "A" in im.mode or "transparency" in im.info:
        extra += 4  # resizing with alpha premultiplies a full-size copy
    return px * (bpp + extra) + 8 * out_px + _SLACK


def _reduce_to_rgb(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    mode = im.mode
    if mode in _CONVERT_FIRST:
        target = _CONVERT_FIRST[mode]
        if mode == "P" and "transparency" in im.info:
            target = "RGBA"
        im = im.convert(target)
    if im.size != size:
        im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if im.mode == "I":  # 16-bit grey: keep the high byte, as Pillow does for 16-bit RGB
        arr = np.asarray(im, np.int64)
        return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def _real_dtype(name: str) -> bool:
    try:
        return np.dtype(name).kind in "uif"
    except TypeError:  # GDAL's complex_int16 and the like
        return False


def _stretch(bands: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """(3, H, W) float → uint8: uint8 sources are kept, others get the per-band 2–98 percentile
    stretch that ingestion applies (rscir.ingest.images)."""
    if dtype == np.uint8:
        return np.clip(np.rint(bands), 0, 255).astype(np.uint8)
    out = np.empty(bands.shape, np.uint8)
    for i, b in enumerate(bands):
        finite = b[np.isfinite(b)]
        lo, hi = np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
        out[i] = np.clip((np.nan_to_num(b, nan=lo) - lo) / (hi - lo) * 255.0, 0, 255)
    return out
