"""The local driver: decoding in worker processes, embedding in this process.

Decoding runs in DataLoader worker processes (with the encoder's picklable ``preprocess``) while
the model embeds in the main process; a worker never dies on one file (the error becomes the
file's reason in the report).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..encoders.base import Encoder, ModelInfo
from ..errors import ImageDecodeError
from ..stores.base import EmbeddingStore
from .archive import FileEntry
from .images import DEFAULT_MAX_PIXELS, ImageMeta, load_image
from .pipeline import Driver, EmbeddedBatch, IndexReport, IngestOptions, run_index


class _DecodeDataset:
    """Map-style dataset for torch's DataLoader: decode + preprocess, errors as values."""

    def __init__(self, root: Path, entries: list[FileEntry], preprocess: Callable[[Image.Image], Any], max_pixels: int):
        self.root = root
        self.entries = entries
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[int, Any, ImageMeta | None, str | None]:
        try:
            img, meta = load_image(self.root / self.entries[i].path, self.max_pixels)
            return i, self.preprocess(img), meta, None
        except ImageDecodeError as e:
            return i, None, None, str(e)
        except Exception as e:  # noqa: BLE001 - a worker must never die on one file
            return i, None, None, f"{type(e).__name__}: {e}"


def iter_decoded(
    root: Path,
    entries: list[FileEntry],
    preprocess: Callable[[Image.Image], Any],
    *,
    batch_size: int,
    num_workers: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[list[tuple[int, Any, ImageMeta | None, str | None]]]:
    """Batches of decoded items in order, decoded by ``num_workers`` processes."""
    from torch.utils.data import DataLoader

    ds = _DecodeDataset(root, entries, preprocess, max_pixels)
    if num_workers <= 0:
        for s in range(0, len(ds), batch_size):
            yield [ds[i] for i in range(s, min(s + batch_size, len(ds)))]
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
    """One decoding process per spare core: the main process needs a core for the model."""
    return max(1, min(8, (os.cpu_count() or 1) - 1))


class LocalDriver(Driver):
    """Decode with ``num_workers`` processes (None: one per spare core; 0: in this process),
    embed with ``encoder`` here."""

    def __init__(self, encoder: Encoder, num_workers: int | None = None) -> None:
        self.encoder = encoder
        self.num_workers = default_workers() if num_workers is None else int(num_workers)

    @contextlib.contextmanager
    def session(self) -> Iterator[ModelInfo]:
        yield self.encoder.info

    def embed(self, root: Path, todo: list[FileEntry], opts: IngestOptions,
              ) -> Iterator[EmbeddedBatch]:
        enc = self.encoder
        for batch in iter_decoded(root, todo, enc.preprocess, batch_size=opts.batch_size,
                                  num_workers=self.num_workers, max_pixels=opts.max_pixels):
            ok = [j for j, b in enumerate(batch) if b[3] is None]
            emb = np.zeros((len(batch), enc.dim), np.float32)
            if ok:
                emb[ok] = enc.encode_preprocessed(enc.collate([batch[j][1] for j in ok]))
            yield EmbeddedBatch(idx=np.array([b[0] for b in batch], np.int64), embeddings=emb,
                                meta=[b[2] for b in batch], errors=[b[3] for b in batch])


def index_folder(
    folder: str | os.PathLike[str],
    store: str | os.PathLike[str] | EmbeddingStore,
    encoder: Encoder,
    *,
    num_workers: int | None = None,
    **options: Any,
) -> IndexReport:
    """Index (or resume indexing) ``folder`` into ``store`` with ``encoder`` on this machine.

    ``options`` are :class:`~rscir.ingest.pipeline.IngestOptions` fields (labels, labels_csv,
    dtype, batch_size, segment_size, max_pixels, progress, compact)."""
    return run_index(folder, store, LocalDriver(encoder, num_workers), IngestOptions(**options))
