"""Archive ingestion: walk, decode, embed, commit to a store."""

from ..errors import ImageDecodeError
from .images import (
    DEFAULT_MAX_PIXELS,
    BadFile,
    FileEntry,
    ImageMeta,
    IndexReport,
    index_folder,
    load_image,
    read_label_csv,
    scan_folder,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "BadFile",
    "FileEntry",
    "ImageDecodeError",
    "ImageMeta",
    "IndexReport",
    "index_folder",
    "load_image",
    "read_label_csv",
    "scan_folder",
]
