"""The local driver: decoding in worker processes, embedding in this process.

Decoding runs in DataLoader worker processes (with the encoder's picklable ``preprocess``) while
the model embeds in the main process; a worker never dies on one file (the error becomes the
file's reason in the report). Units are whole files or chip windows of scenes; each worker keeps
a few scenes open (:class:`~.rasters.RasterCache`), and consecutive units, which share a scene,
go to the same worker in one batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders.base import BandLayout, Encoder, ModelInfo
from ..errors import ImageDecodeError
from ..stores.base import EmbeddingStore
from .archive import FileEntry
from .images import DEFAULT_MAX_PIXELS, decode_unit
from .pipeline import Driver, EmbeddedBatch, IndexReport, IngestOptions, run_index
from .rasters import RasterCache
from .sensors import RasterRead
from .units import ImageMeta, Source, WorkPlan

Decoded = tuple[int, Any, ImageMeta | None, str | None, bool]  # idx, input, meta, error, empty


class _DecodeDataset:
    """Map-style dataset for torch's DataLoader: decode + preprocess, errors as values."""

    def __init__(self, root: Path, plan: WorkPlan, preprocess: Callable[[Any], Any],
                 max_pixels: int, read: RasterRead | None = None):
        self.root = root
        self.plan = plan
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.read = read or RasterRead()
        self.cache = RasterCache(max_pixels=max_pixels)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> Decoded:
        try:
            img, meta, _ = decode_unit(self.root, self.plan.task(i), self.read, self.cache,
                                       self.max_pixels)
            if img is None:
                return i, None, meta, None, True
            return i, self.preprocess(img), meta, None, False
        except ImageDecodeError as e:
            return i, None, None, str(e), False
        except Exception as e:  # noqa: BLE001 - a worker must never die on one file
            return i, None, None, f"{type(e).__name__}: {e}", False


def iter_decoded(
    root: Path,
    plan: WorkPlan | list[FileEntry],
    preprocess: Callable[[Any], Any],
    *,
    batch_size: int,
    num_workers: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    read: RasterRead | None = None,
) -> Iterator[list[Decoded]]:
    """Batches of decoded units in order, decoded by ``num_workers`` processes (a file list
    is a plan of whole files)."""
    from torch.utils.data import DataLoader

    if not isinstance(plan, WorkPlan):
        plan = WorkPlan.whole([Source(e.path, e.size, e.mtime_ns) for e in plan])
    ds = _DecodeDataset(root, plan, preprocess, max_pixels, read)
    if num_workers <= 0:
        try:
            for s in range(0, len(ds), batch_size):
                yield [ds[i] for i in range(s, min(s + batch_size, len(ds)))]
        finally:
            ds.cache.close()
        return
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
        prefetch_factor=4,
        persistent_workers=False,
    )
    yield from loader


def default_workers() -> int:
    """One decoding process per core (at most 16). Decoders sleep while the queue of decoded
    batches is full, so a run bound by the model loses nothing to them, and a run bound by
    decoding and preprocessing (rscir-mini, whose input is a hand-crafted descriptor) gets
    every core instead of all but one."""
    return max(1, min(16, os.cpu_count() or 1))


class LocalDriver(Driver):
    """Decode with ``num_workers`` processes (None: one per spare core; 0: in this process),
    embed with ``encoder`` here."""

    def __init__(self, encoder: Encoder, num_workers: int | None = None) -> None:
        self.encoder = encoder
        self.num_workers = default_workers() if num_workers is None else int(num_workers)

    @contextlib.contextmanager
    def session(self) -> Iterator[ModelInfo]:
        yield self.encoder.info

    def band_request(self) -> str:
        return self.encoder.wants_bands

    def bind_bands(self, layout: BandLayout) -> None:
        self.encoder = self.encoder.for_bands(layout)

    def embed(self, root: Path, plan: WorkPlan, read: RasterRead, opts: IngestOptions,
              ) -> Iterator[EmbeddedBatch]:
        enc = self.encoder
        for batch in iter_decoded(root, plan, enc.preprocess, batch_size=opts.batch_size,
                                  num_workers=self.num_workers, max_pixels=opts.max_pixels,
                                  read=read):
            ok = [j for j, b in enumerate(batch) if b[3] is None and not b[4]]
            emb = np.zeros((len(batch), enc.dim), np.float32)
            if ok:
                emb[ok] = enc.encode_preprocessed(enc.collate([batch[j][1] for j in ok]))
            yield EmbeddedBatch(idx=np.array([b[0] for b in batch], np.int64), embeddings=emb,
                                meta=[b[2] for b in batch], errors=[b[3] for b in batch],
                                empty=np.array([b[4] for b in batch], bool))


def index_folder(
    folder: str | os.PathLike[str],
    store: str | os.PathLike[str] | EmbeddingStore,
    encoder: Encoder,
    *,
    num_workers: int | None = None,
    **options: Any,
) -> IndexReport:
    """Index (or resume indexing) ``folder`` into ``store`` with ``encoder`` on this machine.

    ``folder`` is a folder of images and scenes, a BigEarthNet-S2 folder or a STAC file.
    ``options`` are :class:`~rscir.ingest.pipeline.IngestOptions` fields (labels, labels_csv,
    dtype, batch_size, segment_size, max_pixels, progress, compact, chip_size, stride, edge,
    min_valid, bands, sensor, stretch, nodata, datetime_from, archive, asset,
    bigearthnet_labels)."""
    return run_index(folder, store, LocalDriver(encoder, num_workers), IngestOptions(**options))
