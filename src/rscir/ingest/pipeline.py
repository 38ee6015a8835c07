"""One ingestion pipeline with interchangeable drivers (clip-retrieval's runner/distributor split).

    walk the archive ─► keep new/changed files ─► driver: decode + embed ─► commit in segments

The runner (:func:`run_index`) owns everything that must be the same whoever computes the
embeddings: the file walk, the resume rule (path, size, mtime), labels, item records, the
bad-file report, commits of ``segment_size`` items through the store's atomic ``add`` (one
writer), dropping duplicate deliveries, compaction and the report file. A :class:`Driver`
only turns files into embeddings: :class:`~rscir.ingest.local.LocalDriver` decodes in worker
processes and embeds in this one; :class:`~rscir.ingest.ray_data.RayDriver` runs decode tasks
and encoder actors on a Ray cluster. A store built by either is the same.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders.base import ModelInfo
from ..errors import InvalidArgumentError
from ..stores.base import EmbeddingStore
from ..stores.uri import open_or_create_store
from .archive import FileEntry, LabelMap, changed_entries, item_record, read_label_csv, scan_folder
from .images import DEFAULT_MAX_PIXELS, ImageMeta

log = logging.getLogger(__name__)


@dataclass
class BadFile:
    path: str
    reason: str


@dataclass
class IndexReport:
    """What one indexing run did; written as JSON into the store's reports/ folder."""

    root: str
    store: str
    scanned: int = 0
    already_indexed: int = 0
    embedded: int = 0
    bad: list[BadFile] = field(default_factory=list)
    ignored: list[BadFile] = field(default_factory=list)
    seconds: float = 0.0
    total_items: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"indexed {self.embedded} new/changed images in {self.seconds:.1f}s "
            f"({self.already_indexed} already indexed, {len(self.bad)} bad, "
            f"{len(self.ignored)} non-image files ignored); store now holds {self.total_items} items",
        ]
        if self.bad:
            lines.append("skipped files:")
            lines += [f"  {b.path}: {b.reason}" for b in self.bad[:50]]
            if len(self.bad) > 50:
                lines.append(f"  ... and {len(self.bad) - 50} more (see the report file)")
        return "\n".join(lines)


@dataclass
class EmbeddedBatch:
    """What a driver delivers: for positions ``idx`` of the file list, an embedding row (valid
    where ``errors[i]`` is None), what decoding learnt of the file, or why it failed."""

    idx: np.ndarray
    embeddings: np.ndarray
    meta: list[ImageMeta | None]
    errors: list[str | None]


@dataclass(frozen=True)
class IngestOptions:
    """Settings the runner and every driver share."""

    labels: str = "folder"
    labels_csv: str | os.PathLike[str] | None = None
    dtype: str = "float16"
    batch_size: int = 64
    segment_size: int = 2048
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True
    compact: bool = True

    def check(self) -> IngestOptions:
        if self.batch_size < 1 or self.segment_size < 1:
            raise InvalidArgumentError("--batch-size and --segment-size must be >= 1")
        if self.labels not in ("folder", "none", "csv"):
            raise InvalidArgumentError(f"labels must be folder, none or csv, got {self.labels!r}")
        if self.labels == "csv" and self.labels_csv is None:
            raise InvalidArgumentError("labels='csv' needs labels_csv")
        return self


class Driver(ABC):
    """Turns archive files into embeddings (see module docstring)."""

    @abstractmethod
    def session(self) -> contextlib.AbstractContextManager[ModelInfo]:
        """Set up (start a cluster, build a probe encoder ...); yields the model's identity,
        which the store is opened or created with."""

    @abstractmethod
    def embed(self, root: Path, todo: list[FileEntry], opts: IngestOptions,
              ) -> Iterator[EmbeddedBatch]:
        """Batches covering every position of ``todo`` at least once, in any order."""


class _Writer:
    """Buffers delivered rows and commits one store segment per ``segment_size`` items; a row
    delivered twice (a retried task) is kept once."""

    def __init__(self, store: EmbeddingStore, todo: list[FileEntry], report: IndexReport,
                 opts: IngestOptions, label_map: LabelMap | None) -> None:
        self.store, self.todo, self.report, self.opts = store, todo, report, opts
        self.label_map = label_map
        self.seen = np.zeros(len(todo), dtype=bool)
        self.emb: list[np.ndarray] = []
        self.items: list[dict[str, Any]] = []

    def take(self, b: EmbeddedBatch) -> int:
        """Buffer a batch (committing full segments); returns how many rows were new."""
        idx = np.asarray(b.idx, np.int64)
        _, first = np.unique(idx, return_index=True)
        fresh = np.zeros(len(idx), bool)
        fresh[first] = True
        fresh &= ~self.seen[idx]
        self.seen[idx[fresh]] = True
        good = []
        for j in np.flatnonzero(fresh).tolist():
            err = b.errors[j]
            entry = self.todo[int(idx[j])]
            if err is not None:
                self.report.bad.append(BadFile(entry.path, err))
                continue
            good.append(j)
            self.items.append(item_record(entry, b.meta[j], self.opts.labels, self.label_map))
        if good:
            self.emb.append(np.asarray(b.embeddings[good], np.float32))
        if len(self.items) >= self.opts.segment_size:
            self.flush()
        return int(fresh.sum())

    def flush(self) -> None:
        if self.items:
            self.store.add(np.concatenate(self.emb), self.items)
            self.report.embedded += len(self.items)
            self.emb.clear()
            self.items.clear()


def run_index(
    folder: str | os.PathLike[str],
    store: str | os.PathLike[str] | EmbeddingStore,
    driver: Driver,
    opts: IngestOptions | None = None,
) -> IndexReport:
    """Index (or resume indexing) ``folder`` into ``store`` (a directory, a ``postgresql://``
    URI, or an open writable store) with ``driver``.

    Items are committed every ``segment_size`` images, so an interrupted run loses at most one
    segment of work and the next run picks up where it stopped."""
    from tqdm.auto import tqdm

    o = (opts or IngestOptions()).check()
    t0 = time.perf_counter()
    root = Path(folder).resolve()
    entries, others = scan_folder(root)
    label_map = read_label_csv(o.labels_csv) if o.labels_csv is not None else None
    with driver.session() as info:
        if isinstance(store, EmbeddingStore):
            st, owned = store, False
            st.check_model(info)
        else:
            st, owned = open_or_create_store(store, info, root, dtype=o.dtype), True
        report = IndexReport(root=str(root), store=st.location, scanned=len(entries))
        report.ignored = [BadFile(e.path, f"not an image file type "
                                  f"({Path(e.path).suffix or 'no extension'})") for e in others]
        try:
            todo = changed_entries(st, entries)
            report.already_indexed = len(entries) - len(todo)
            writer = _Writer(st, todo, report, o, label_map)
            bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not o.progress)
            try:
                for batch in driver.embed(root, todo, o) if todo else ():
                    bar.update(writer.take(batch))
            except BaseException:
                # what was already embedded is committed before the error propagates
                with contextlib.suppress(Exception):
                    writer.flush()
                raise
            finally:
                bar.close()
                report.bad.sort(key=lambda b: b.path)  # delivery order may vary: report stably
            writer.flush()
            if o.compact:
                st.compact()
            report.total_items = len(st)
        finally:
            report.seconds = time.perf_counter() - t0
            write_report(st, report)
            if owned:
                st.close()
    return report


def write_report(store: EmbeddingStore, report: IndexReport) -> None:
    """``reports/index-<time>-<pid>.json`` and ``reports/bad_files.csv`` in the store's folder."""
    d = store.local_dir / "reports"
    try:
        d.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (d / f"index-{stamp}-{os.getpid()}.json").write_text(json.dumps(report.to_dict(), indent=1))
        with open(d / "bad_files.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "reason"])
            for b in report.bad:
                w.writerow([b.path, b.reason])
    except OSError as e:  # the report is informative; never fail a finished index on it
        log.warning("could not write the index report: %s", e)
