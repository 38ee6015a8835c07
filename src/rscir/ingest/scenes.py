"""Scenes cut into chips: the chip grid, planning units, and the ledger of finished scenes.

``rscir index PATH --chip-size N [--stride S] [--edge pad|drop] [--min-valid F]`` cuts every
raster wider or taller than N pixels into N×N windows, stride S (default N, no overlap), from
the top-left corner, row by row. At the right and bottom edges a chip that runs past the scene
is **padded** (default: the missing pixels are nodata and count as invalid) or **dropped**
(``--edge drop``: only whole chips). A chip with less than ``--min-valid`` (default 0.5) of
valid pixels (not nodata, not NaN, not masked, inside the scene; with no nodata declared, not 0
in every band) is skipped and counted. Rasters no larger than a chip stay one item.

Resuming: the store says which chips are done (item path = scene + window, with the scene's
size and mtime). Empty chips are not items, so a finished scene is recorded in the store's
``artifacts/ingest/scenes.jsonl`` after its last chip is committed; a rerun skips those scenes
without opening them, and finishes a half-done scene chip by chip.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ImageDecodeError, InvalidArgumentError, StoreError
from ..stores.base import EmbeddingStore
from .rasters import href_of, probe_size
from .units import Source, WorkPlan

log = logging.getLogger(__name__)

LEDGER = "scenes.jsonl"
SETTINGS = "settings.json"
ARTIFACT = "ingest"


@dataclass(frozen=True)
class ChipSpec:
    """How scenes are cut: chip size, stride, and what happens at the edges."""

    size: int
    stride: int | None = None
    edge: str = "pad"

    def check(self) -> ChipSpec:
        if self.size < 8:
            raise InvalidArgumentError(f"--chip-size must be >= 8 pixels, got {self.size}")
        if self.stride is not None and self.stride < 1:
            raise InvalidArgumentError(f"--stride must be >= 1, got {self.stride}")
        if self.edge not in ("pad", "drop"):
            raise InvalidArgumentError(f"--edge must be pad or drop, got {self.edge!r}")
        return self

    @property
    def step(self) -> int:
        return self.stride or self.size

    @property
    def key(self) -> str:
        return f"{self.size}/{self.step}/{self.edge}"

    def starts(self, length: int) -> np.ndarray:
        """Offsets of the chips along one axis of ``length`` pixels."""
        n, s = self.size, self.step
        if self.edge == "drop":
            k = (length - n) // s + 1 if length >= n else 0
        else:
            k = 1 + max(0, math.ceil((length - n) / s)) if length > 0 else 0
        return np.arange(k, dtype=np.int64) * s

    def windows(self, width: int, height: int) -> np.ndarray:
        """(n, 4) windows (col, row, width, height), row by row."""
        cols, rows = self.starts(width), self.starts(height)
        cc, rr = np.meshgrid(cols, rows)
        n = cc.size
        return np.stack([cc.ravel(), rr.ravel(), np.full(n, self.size), np.full(n, self.size)],
                        axis=1).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "stride": self.step, "edge": self.edge}


# --------------------------------------------------------------------------- the ledger
class SceneLedger:
    """Scenes whose every chip is committed (or skipped as empty), in the store's artifacts."""

    def __init__(self, store: EmbeddingStore) -> None:
        self.file = store.artifact_dir(ARTIFACT) / LEDGER
        self.done: dict[tuple[str, int, int, str], int] = {}
        if self.file.is_file():
            for line in self.file.read_text().splitlines():
                try:
                    d = json.loads(line)
                    self.done[(d["path"], int(d["size"]), int(d["mtime_ns"]), d["grid"])] = int(
                        d["units"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a crash: that scene is simply checked again

    def units(self, s: Source, grid: str) -> int | None:
        return self.done.get((s.path, s.size, s.mtime_ns, grid))

    def record(self, items: Iterable[tuple[Source, int]], grid: str) -> None:
        lines = []
        for s, n in items:
            self.done[(s.path, s.size, s.mtime_ns, grid)] = n
            lines.append(json.dumps({"path": s.path, "size": s.size, "mtime_ns": s.mtime_ns,
                                     "grid": grid, "units": n}))
        if lines:
            with open(self.file, "a") as f:
                f.write("\n".join(lines) + "\n")


def check_settings(store: EmbeddingStore, settings: dict[str, Any]) -> None:
    """One store, one way of reading the archive: the bands, scaling and chip grid of the first
    run are recorded (thumbnails use them) and a later run with others is refused."""
    f = store.artifact_dir(ARTIFACT) / SETTINGS
    if f.is_file():
        try:
            old = json.loads(f.read_text())
        except ValueError:
            old = None
        if isinstance(old, dict):
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                raise StoreError(
                    f"store {store.location} was indexed with other settings ("
                    + "; ".join(f"{k}: {old.get(k)} now {settings.get(k)}" for k in diff)
                    + "): use the same options, or another store")
            return
    f.write_text(json.dumps(settings, indent=1))


def read_settings(store: EmbeddingStore) -> dict[str, Any]:
    """What :func:`check_settings` recorded ({} for stores indexed before, or elsewhere)."""
    f = store.local_dir / "artifacts" / ARTIFACT / SETTINGS
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def read_sources(store: EmbeddingStore) -> dict[str, dict[str, Any]]:
    """What :func:`record_sources` wrote, by source path ({} when nothing)."""
    f = store.local_dir / "artifacts" / ARTIFACT / "sources.jsonl"
    out: dict[str, dict[str, Any]] = {}
    try:
        lines = f.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            d = json.loads(line)
            out[str(d["path"])] = d
        except (ValueError, KeyError, TypeError):
            continue
    return out


# --------------------------------------------------------------------------- planning
@dataclass
class ChipPlan:
    plan: WorkPlan
    already: int  # units of scenes the ledger says are finished
    scenes: int  # sources cut into chips
    grid_units: np.ndarray  # per source of ``plan``: its number of chips (0: a whole source)


def plan_chips(root: Path, sources: list[Source], chip: ChipSpec | None,
               ledger: SceneLedger | None) -> ChipPlan:
    """Units for ``sources``: whole sources, or the chips of those larger than a chip."""
    if chip is None:
        return ChipPlan(WorkPlan.whole(sources), 0, 0, np.zeros(len(sources), np.int64))
    src_parts: list[np.ndarray] = []
    win_parts: list[np.ndarray] = []
    out_sources: list[Source] = []
    already = scenes = 0
    grid: list[int] = []
    whole = np.full((1, 4), -1, np.int64)
    for s in sources:
        if ledger is not None:
            n = ledger.units(s, chip.key)
            if n is not None:
                already += n
                continue
        try:  # a band stack is cut on its finest grid
            w, h = max(probe_size(href_of(root, f)) for f in dict.fromkeys(s.band_files))
        except ImageDecodeError:
            w = h = 0  # decoding the whole source reports why
        k = len(out_sources)
        if w > chip.size or h > chip.size:
            win = chip.windows(w, h)
            out_sources.append(Source(s.path, s.size, s.mtime_ns, s.files, s.extra, True))
            scenes += 1
            grid.append(len(win))
        else:
            win = whole
            out_sources.append(s)
            grid.append(0)
        src_parts.append(np.full(len(win), k, np.int64))
        win_parts.append(win)
    g = np.asarray(grid, np.int64)
    if not src_parts:
        return ChipPlan(WorkPlan(out_sources, np.zeros(0, np.int64), np.zeros((0, 4), np.int64)),
                        already, scenes, g)
    return ChipPlan(WorkPlan(out_sources, np.concatenate(src_parts), np.concatenate(win_parts)),
                    already, scenes, g)
