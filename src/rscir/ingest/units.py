"""Work units: what one item of the store is made from.

A *source* is one thing found in the archive: an image file, a scene (a raster larger than a
chip), a BigEarthNet patch folder, a STAC asset. A *unit* is one item to embed: a whole source,
or one chip window of a scene. The runner plans units (:class:`WorkPlan`), drivers decode and
embed them, the writer commits them — the same pipeline for tiles, scenes and patch archives.

Item paths (the store's ``path`` column, unique per item):

* a whole file: its path relative to the archive root, ``tiles/beach/beach01.jpg``;
* a chip: the scene's path and its pixel window, ``scenes/T33UUP.tif#window=COL,ROW,W,H``
  (column and row offsets of the top-left pixel, width and height, in pixels of the scene;
  a padded edge chip keeps its full size and may reach past the scene);
* a BigEarthNet patch: the patch folder, ``S2A_MSIL2A_..._T33UUP/S2A_MSIL2A_..._26_57``.

:func:`split_item_path` reverses the chip notation; ``EmbeddingStore.resolve_path`` maps a chip
to its scene file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WINDOW_RE = re.compile(r"^(?P<path>.+)#window=(?P<c>-?\d+),(?P<r>-?\d+),(?P<w>\d+),(?P<h>\d+)$")
Window = tuple[int, int, int, int]  # col_off, row_off, width, height


def chip_path(path: str, window: Window) -> str:
    c, r, w, h = (int(v) for v in window)
    return f"{path}#window={c},{r},{w},{h}"


def split_item_path(rel: str) -> tuple[str, Window | None]:
    """(source path, chip window or None) of an item path."""
    m = WINDOW_RE.match(rel)
    if m is None:
        return rel, None
    return m["path"], (int(m["c"]), int(m["r"]), int(m["w"]), int(m["h"]))


@dataclass(frozen=True)
class ImageMeta:
    """What decoding learnt of a unit: pixel size, where (WGS84 centre, footprints in WGS84 and
    in the native CRS as WKB) and when (ISO time in UTC), when the raster says so."""

    width: int
    height: int
    lon: float = float("nan")
    lat: float = float("nan")
    crs: str | None = None
    footprint: bytes | None = None
    footprint_native: bytes | None = None
    datetime: str | None = None


@dataclass(frozen=True)
class Source:
    """One thing of the archive that items are made from.

    ``files``: the files whose bands make the image when they are not ``path`` itself (one
    band each: BigEarthNet band files, STAC band assets), relative to the root or URLs.
    ``extra``: item metadata the archive itself states (labels, datetime, footprint ...);
    it wins over what decoding finds."""

    path: str
    size: int
    mtime_ns: int
    files: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    chipped: bool = False

    @property
    def band_files(self) -> tuple[str, ...]:
        return self.files or (self.path,)


@dataclass(frozen=True)
class UnitTask:
    """What a decoder needs for one unit (small and picklable; one per row for Ray)."""

    files: tuple[str, ...]
    window: Window | None
    stacked: bool  # files are one band each (BigEarthNet, STAC band assets)


@dataclass
class WorkPlan:
    """Units to embed: ``src[i]`` indexes ``sources``; ``win[i]`` is a chip window, or
    (-1, -1, -1, -1) for the whole source. Arrays, so millions of chips stay small."""

    sources: list[Source]
    src: np.ndarray
    win: np.ndarray

    @classmethod
    def whole(cls, sources: list[Source]) -> WorkPlan:
        n = len(sources)
        return cls(sources, np.arange(n, dtype=np.int64), np.full((n, 4), -1, np.int64))

    def __len__(self) -> int:
        return len(self.src)

    def window(self, i: int) -> Window | None:
        w = self.win[i]
        return None if w[2] < 0 else (int(w[0]), int(w[1]), int(w[2]), int(w[3]))

    def source(self, i: int) -> Source:
        return self.sources[int(self.src[i])]

    def path(self, i: int) -> str:
        w = self.window(i)
        p = self.source(i).path
        return p if w is None else chip_path(p, w)

    def paths(self) -> list[str]:
        return [self.path(i) for i in range(len(self))]

    def task(self, i: int) -> UnitTask:
        s = self.source(i)
        return UnitTask(s.band_files, self.window(i), bool(s.files))
