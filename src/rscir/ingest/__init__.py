"""Archive ingestion: walk, decode, embed, commit to a store — one pipeline, two drivers.

:func:`index_folder` runs it on this machine (:class:`~.local.LocalDriver`);
:func:`rscir.ingest.ray_data.index_folder_ray` on a Ray cluster (imported only when used).
Archives are folders of images, scenes cut into chips (:mod:`.scenes`), BigEarthNet-S2
(:mod:`.bigearthnet`) and STAC (:mod:`.stac`); precomputed embedding collections (GeoParquet)
are imported by :mod:`.collections`.
"""

from ..errors import ImageDecodeError
from .archive import FileEntry, read_label_csv, scan_folder
from .images import DEFAULT_MAX_PIXELS, load_image
from .local import LocalDriver, index_folder
from .pipeline import BadFile, Driver, EmbeddedBatch, IndexReport, IngestOptions, run_index
from .scenes import ChipSpec
from .sensors import PRESETS, RasterRead
from .units import ImageMeta, WorkPlan, chip_path, split_item_path

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "PRESETS",
    "BadFile",
    "ChipSpec",
    "Driver",
    "EmbeddedBatch",
    "FileEntry",
    "ImageDecodeError",
    "ImageMeta",
    "IndexReport",
    "IngestOptions",
    "LocalDriver",
    "RasterRead",
    "WorkPlan",
    "chip_path",
    "index_folder",
    "load_image",
    "read_label_csv",
    "run_index",
    "scan_folder",
    "split_item_path",
]
