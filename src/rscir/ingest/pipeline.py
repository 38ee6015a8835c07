"""One ingestion pipeline with interchangeable drivers (clip-retrieval's runner/distributor split).

    find the archive's sources ─► plan units (whole files, or chips of scenes) ─► keep new/changed
    ─► driver: decode + embed ─► commit in segments

The runner (:func:`run_index`) owns everything that must be the same whoever computes the
embeddings: the archive walk (a folder, BigEarthNet, STAC: :mod:`.discover`), the chip grid
(:mod:`.scenes`), the resume rule (item path, source size, mtime; finished scenes), labels,
item records, the bad-file report, commits of ``segment_size`` items through the store's atomic
``add`` (one writer), dropping duplicate deliveries, compaction and the report file. A
:class:`Driver` only turns work units (:class:`~.units.WorkPlan`) into embeddings:
:class:`~rscir.ingest.local.LocalDriver` decodes in worker processes and embeds in this one;
:class:`~rscir.ingest.ray_data.RayDriver` runs decode tasks and encoder actors on a Ray
cluster. A store built by either is the same.
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

from ..encoders.base import BandLayout, ModelInfo
from ..errors import InvalidArgumentError
from ..stores.base import EmbeddingStore
from ..stores.uri import open_or_create_store
from .archive import LabelMap, changed_mask, item_record, read_label_csv
from .discover import ARCHIVE_KINDS, Archive, band_layout, discover
from .geo import FilenameTime
from .images import DEFAULT_MAX_PIXELS
from .scenes import (
    ARTIFACT,
    ChipSpec,
    SceneLedger,
    check_settings,
    plan_chips,
    read_sources,
)
from .sensors import RasterRead, parse_bands, parse_stretch
from .units import ImageMeta, WorkPlan

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
    archive: str = "folder"
    scenes: int = 0  # sources cut into chips in this run
    chips: int = 0  # chips planned in this run (embedded, empty or bad)
    empty_chips: int = 0  # chips skipped as mostly nodata/empty

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        chips = (f"; {self.chips} chips of {self.scenes} scene(s), {self.empty_chips} empty chips "
                 "skipped" if self.scenes or self.empty_chips else "")
        lines = [
            f"indexed {self.embedded} new/changed items in {self.seconds:.1f}s "
            f"({self.already_indexed} already indexed, {len(self.bad)} bad, "
            f"{len(self.ignored)} files ignored{chips}); store now holds {self.total_items} items",
        ]
        if self.bad:
            lines.append("skipped files:")
            lines += [f"  {b.path}: {b.reason}" for b in self.bad[:50]]
            if len(self.bad) > 50:
                lines.append(f"  ... and {len(self.bad) - 50} more (see the report file)")
        return "\n".join(lines)


@dataclass
class EmbeddedBatch:
    """What a driver delivers: for positions ``idx`` of the work plan, an embedding row (valid
    where ``errors[i]`` is None and ``empty[i]`` is False), what decoding learnt of the unit, or
    why it failed; ``empty[i]``: a chip skipped as mostly nodata."""

    idx: np.ndarray
    embeddings: np.ndarray
    meta: list[ImageMeta | None]
    errors: list[str | None]
    empty: np.ndarray | None = None


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
    # scenes → chips (None: one item per image, as always)
    chip_size: int | None = None
    stride: int | None = None
    edge: str = "pad"
    min_valid: float = 0.5
    # bands and 8-bit scaling (:mod:`.sensors`)
    bands: str | tuple[str | int, ...] | None = None
    sensor: str | None = None
    stretch: str | tuple[float, float] | None = None
    nodata: float | None = None
    # where and when; what the archive is
    datetime_from: str | None = None
    archive: str = "auto"
    asset: str | None = None
    bigearthnet_labels: int = 19

    def check(self) -> IngestOptions:
        if self.batch_size < 1 or self.segment_size < 1:
            raise InvalidArgumentError("--batch-size and --segment-size must be >= 1")
        if self.labels not in ("folder", "none", "csv"):
            raise InvalidArgumentError(f"labels must be folder, none or csv, got {self.labels!r}")
        if self.labels == "csv" and self.labels_csv is None:
            raise InvalidArgumentError("labels='csv' needs labels_csv")
        if self.archive not in ARCHIVE_KINDS:
            raise InvalidArgumentError(f"archive must be one of {', '.join(ARCHIVE_KINDS)}")
        if self.chip_size is None and self.stride is not None:
            raise InvalidArgumentError("--stride needs --chip-size")
        self.chip()
        self.raster_read()
        if self.datetime_from is not None:
            _ = FilenameTime(self.datetime_from).regex
        return self

    def chip(self) -> ChipSpec | None:
        if self.chip_size is None:
            return None
        return ChipSpec(int(self.chip_size), self.stride, self.edge).check()

    def raster_read(self) -> RasterRead:
        return RasterRead(parse_bands(self.bands), self.sensor, parse_stretch(self.stretch),
                          self.nodata, self.min_valid).check()


class Driver(ABC):
    """Turns archive files into embeddings (see module docstring)."""

    @abstractmethod
    def session(self) -> contextlib.AbstractContextManager[ModelInfo]:
        """Set up (start a cluster, build a probe encoder ...); yields the model's identity,
        which the store is opened or created with."""

    @abstractmethod
    def embed(self, root: Path, plan: WorkPlan, read: RasterRead, opts: IngestOptions,
              ) -> Iterator[EmbeddedBatch]:
        """Batches covering every unit of ``plan`` at least once, in any order; rasters are
        read as ``read`` says."""

    def band_request(self) -> str:
        """What the encoder reads of a raster: "rgb" (the 8-bit composite) or "all" (every
        band as reflectance); known before :meth:`session`, which it changes."""
        return "rgb"

    def bind_bands(self, layout: BandLayout) -> None:
        """Set an all-band encoder up for the archive's bands (before :meth:`session`);
        drivers whose :meth:`band_request` can say "all" override this."""
        raise InvalidArgumentError(
            f"{type(self).__name__} runs RGB encoders only; index with the local driver")


class _Writer:
    """Buffers delivered rows and commits one store segment per ``segment_size`` items; a row
    delivered twice (a retried task) is kept once. After each commit, scenes whose every chip
    is now committed (or empty) go into the ledger."""

    def __init__(self, store: EmbeddingStore, plan: WorkPlan, report: IndexReport,
                 opts: IngestOptions, label_map: LabelMap | None,
                 ledger: SceneLedger | None = None, grid_units: np.ndarray | None = None,
                 grid: str = "") -> None:
        self.store, self.plan, self.report, self.opts = store, plan, report, opts
        self.label_map = label_map
        self.when = FilenameTime(opts.datetime_from) if opts.datetime_from else None
        self.seen = np.zeros(len(plan), dtype=bool)
        self.emb: list[np.ndarray] = []
        self.items: list[dict[str, Any]] = []
        self.ledger, self.grid = ledger, grid
        n_src = len(plan.sources)
        self.grid_units = grid_units if grid_units is not None else np.zeros(n_src, np.int64)
        self.left = np.bincount(plan.src, minlength=n_src).astype(np.int64)
        self.failed = np.zeros(n_src, bool)
        self.recorded = np.zeros(n_src, bool)

    def take(self, b: EmbeddedBatch) -> int:
        """Buffer a batch (committing full segments); returns how many rows were new."""
        idx = np.asarray(b.idx, np.int64)
        _, first = np.unique(idx, return_index=True)
        fresh = np.zeros(len(idx), bool)
        fresh[first] = True
        fresh &= ~self.seen[idx]
        self.seen[idx[fresh]] = True
        empty = b.empty if b.empty is not None else np.zeros(len(idx), bool)
        good = []
        plan = self.plan
        for j in np.flatnonzero(fresh).tolist():
            i = int(idx[j])
            err = b.errors[j]
            s = int(plan.src[i])
            self.left[s] -= 1
            if err is not None:
                self.report.bad.append(BadFile(plan.path(i), err))
                self.failed[s] = True
                continue
            if empty[j]:
                self.report.empty_chips += 1
                continue
            good.append(j)
            self.items.append(item_record(plan.path(i), plan.sources[s], b.meta[j],
                                          self.opts.labels, self.label_map, self.when))
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
        if self.ledger is not None:  # everything delivered so far is committed now
            done = (self.left == 0) & ~self.failed & ~self.recorded & (self.grid_units > 0)
            ks = np.flatnonzero(done)
            self.ledger.record(((self.plan.sources[k], int(self.grid_units[k])) for k in ks),
                               self.grid)
            self.recorded[ks] = True


def run_index(
    folder: str | os.PathLike[str],
    store: str | os.PathLike[str] | EmbeddingStore,
    driver: Driver,
    opts: IngestOptions | None = None,
) -> IndexReport:
    """Index (or resume indexing) the archive at ``folder`` (a folder of images and scenes, a
    BigEarthNet-S2 folder, a STAC catalog or ItemCollection file) into ``store`` (a directory,
    a ``postgresql://`` URI, or an open writable store) with ``driver``.

    Items are committed every ``segment_size`` units, so an interrupted run loses at most one
    segment of work and the next run picks up where it stopped."""
    from tqdm.auto import tqdm

    o = (opts or IngestOptions()).check()
    t0 = time.perf_counter()
    all_bands = driver.band_request() == "all"
    arch = discover(folder, o.archive, o.raster_read(), asset=o.asset,
                    bigearthnet_labels=o.bigearthnet_labels, all_bands=all_bands)
    if all_bands and (layout := band_layout(arch, o.max_pixels)) is not None:
        driver.bind_bands(layout)  # the descriptor's size, so the model's identity, needs it
    root = arch.root
    chip = o.chip()
    label_map = read_label_csv(o.labels_csv) if o.labels_csv is not None else None
    with driver.session() as info:
        if isinstance(store, EmbeddingStore):
            st, owned = store, False
            st.check_model(info)
        else:
            st, owned = open_or_create_store(store, info, root, dtype=o.dtype), True
        report = IndexReport(root=str(root), store=st.location, scanned=len(arch.sources),
                             archive=arch.kind)
        report.ignored = [BadFile(p, why) for p, why in arch.ignored]
        try:
            check_settings(st, ingest_settings(arch, chip))
            record_sources(st, arch)
            ledger = SceneLedger(st) if chip is not None else None
            planned = plan_chips(root, arch.sources, chip, ledger)
            plan = planned.plan
            keep = changed_mask(st, plan.paths(), np.array([s.size for s in plan.sources],
                                np.int64)[plan.src], np.array([s.mtime_ns for s in plan.sources],
                                np.int64)[plan.src])
            report.already_indexed = planned.already + int((~keep).sum())
            todo = WorkPlan(plan.sources, plan.src[keep], plan.win[keep])
            if arch.complete is not None and len(todo):
                todo = _completed(todo, arch.complete)
            report.scenes = int(planned.scenes)
            report.chips = int((todo.win[:, 2] >= 0).sum())
            writer = _Writer(st, todo, report, o, label_map, ledger, planned.grid_units,
                             chip.key if chip is not None else "")
            bar = tqdm(total=len(todo), desc="indexing", unit="item", disable=not o.progress)
            try:
                for batch in driver.embed(root, todo, arch.read, o) if len(todo) else ():
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


def _completed(plan: WorkPlan, complete: Any) -> WorkPlan:
    """The plan with the archive's metadata filled in for the sources it still needs."""
    used = np.unique(plan.src)
    sources = list(plan.sources)
    for k, s in zip(used.tolist(), complete([sources[k] for k in used.tolist()]), strict=True):
        sources[k] = s
    return WorkPlan(sources, plan.src, plan.win)


def ingest_settings(arch: Archive, chip: ChipSpec | None) -> dict[str, Any]:
    """How this store reads its archive (recorded once; thumbnails read it back)."""
    return {"archive": arch.kind, "read": arch.read.to_dict(),
            "chip": chip.to_dict() if chip is not None else None,
            "band_files": list(arch.band_files) or None}


def record_sources(store: EmbeddingStore, arch: Archive) -> None:
    """``artifacts/ingest/sources.jsonl``: the archive's id and band files of each source that
    has them (STAC item ids, multi-asset items), for people and for thumbnails."""
    rows = {s.path: {"path": s.path, "id": arch.source_ids.get(s.path),
                     "files": list(s.files) or None}
            for s in arch.sources if s.path in arch.source_ids or s.files}
    if not rows or arch.kind.startswith("bigearthnet"):
        return
    f = store.artifact_dir(ARTIFACT) / "sources.jsonl"
    old = read_sources(store)
    old.update(rows)
    tmp = f.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in old.values()))
    os.replace(tmp, f)


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
