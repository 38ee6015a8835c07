"""Archive ingestion: walk, decode, embed, commit to a store — one pipeline, two drivers.

:func:`index_folder` runs it on this machine (:class:`~.local.LocalDriver`);
:func:`rscir.ingest.ray_data.index_folder_ray` on a Ray cluster (imported only when used).
"""

from ..errors import ImageDecodeError
from .archive import FileEntry, read_label_csv, scan_folder
from .images import DEFAULT_MAX_PIXELS, ImageMeta, load_image
from .local import LocalDriver, index_folder
from .pipeline import BadFile, Driver, EmbeddedBatch, IndexReport, IngestOptions, run_index

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "BadFile",
    "Driver",
    "EmbeddedBatch",
    "FileEntry",
    "ImageDecodeError",
    "ImageMeta",
    "IndexReport",
    "IngestOptions",
    "LocalDriver",
    "index_folder",
    "load_image",
    "read_label_csv",
    "run_index",
    "scan_folder",
]
