"""Turning untrusted uploaded bytes into an RGB image, or a precise HTTP error.

The pixel count is checked from the header before any pixel is decoded, so a small file that
claims to be huge (a decompression bomb) is refused without allocating it. TIFFs (16-bit,
multi-band, GeoTIFF) go through the same decoder as ingestion (:func:`rscir.ingest.load_image`).
"""

from __future__ import annotations

import io
import tempfile
import warnings
from dataclasses import dataclass

from PIL import Image

from ..ingest.images import ImageDecodeError, load_image


@dataclass
class UploadError(Exception):
    """Why an upload is refused: ``status`` is 413 (too large), 415 (not an image) or 422."""

    status: int
    detail: str

    def __str__(self) -> str:
        return self.detail


def decode_upload(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """RGB image from uploaded bytes; raises :class:`UploadError`."""
    if len(data) == 0:
        raise UploadError(422, "the uploaded file is empty")
    if len(data) > max_bytes:
        raise UploadError(413, f"the upload is larger than {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(413, f"the image has more than {max_pixels} pixels") from None
    except Image.UnidentifiedImageError:
        raise UploadError(415, "the upload is not an image (JPEG, PNG, TIFF, WebP, BMP)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UploadError(422, f"the image header is corrupt: {e}") from None
    if w * h > max_pixels:
        raise UploadError(413, f"the image is {w}×{h} pixels, more than {max_pixels}")
    if w < 1 or h < 1:
        raise UploadError(422, "the image has no pixels")
    if fmt == "TIFF":
        return _decode_tiff(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(413, f"the image has more than {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UploadError(422, f"the image is corrupt or truncated: {e}") from None


def _decode_tiff(data: bytes, max_pixels: int) -> Image.Image:
    with tempfile.NamedTemporaryFile(suffix=".tif") as f:
        f.write(data)
        f.flush()
        try:
            img, _ = load_image(f.name, max_pixels)
        except ImageDecodeError as e:
            raise UploadError(422, f"the TIFF cannot be decoded: {e}") from None
    return img
