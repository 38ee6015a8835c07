"""Metadata filters on search results — where, when, what — the same for every store.

A filter only restricts *which* items may be returned: WeiCom's normalization is always over the
whole archive (from the store's moments), so a filtered hit has exactly its unfiltered score.

Geometry follows RFC 7946 / GeoJSON: WGS84 longitude/latitude. An item's footprint (its polygon,
or its centre point when only that is known) must *intersect* the area: a bounding box
``(west, south, east, north)`` (``west > east`` crosses the antimeridian) and/or a GeoJSON
geometry. Dates are UTC; ``start`` and ``end`` are inclusive and a date without a time covers its
whole day. Items with no footprint (or no date) never pass a spatial (or date) filter.

The directory store evaluates :meth:`ItemFilter.mask` on a :class:`FilterIndex` (vectorized
arrays built once per store generation); the Postgres store translates the same fields to SQL and
runs the exact polygon test on the candidates its bounding-box columns select.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InvalidArgumentError

BBox = tuple[float, float, float, float]


def parse_bbox(value: str | Iterable[float]) -> BBox:
    """``"W,S,E,N"`` or four numbers → a checked WGS84 box."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        w, s, e, n = (float(x) for x in parts)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"a bbox is four numbers W,S,E,N, got {value!r}") from None
    if not all(math.isfinite(v) for v in (w, s, e, n)):
        raise InvalidArgumentError("bbox values must be finite")
    if not (-180 <= w <= 180 and -180 <= e <= 180 and -90 <= s <= n <= 90):
        raise InvalidArgumentError(
            f"bbox {w},{s},{e},{n} is not W,S,E,N in WGS84 degrees (lon in [-180, 180], "
            "lat in [-90, 90], south <= north; west > east crosses the antimeridian)")
    return (w, s, e, n)


def parse_datetime(value: str | dt.datetime | dt.date | None, *, end: bool = False,
                   ) -> pd.Timestamp | None:
    """An ISO date or datetime as a UTC timestamp (naive means UTC); a bare date is the start
    of its day, or its last instant for ``end``."""
    if value is None or value == "":
        return None
    try:
        ts = pd.Timestamp(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"not an ISO date or datetime: {value!r} (e.g. 2024-05-01 or "
            "2024-05-01T10:30:00Z)") from None
    bare_date = isinstance(value, dt.date) and not isinstance(value, dt.datetime) or (
        isinstance(value, str) and len(value.strip()) <= 10)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    if end and bare_date:
        ts = ts + pd.Timedelta(days=1) - pd.Timedelta(1, "ns")
    return ts


def load_geometry(value: str | Mapping[str, Any] | Path) -> dict[str, Any]:
    """A GeoJSON geometry from a mapping, a JSON string, or a file holding a geometry, a Feature
    or a FeatureCollection (whose geometries are united)."""
    obj: Any = value
    if isinstance(value, Path) or (isinstance(value, str) and not value.lstrip().startswith("{")):
        p = Path(value)
        if not p.is_file():
            raise InvalidArgumentError(f"no GeoJSON file at {p}")
        try:
            obj = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidArgumentError(f"{p} is not GeoJSON: {e}") from None
    elif isinstance(value, str):
        try:
            obj = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"not GeoJSON: {e}") from None
    if not isinstance(obj, Mapping):
        raise InvalidArgumentError("GeoJSON must be an object (a geometry, Feature or "
                                   "FeatureCollection)")
    kind = obj.get("type")
    if kind == "Feature":
        return load_geometry(obj.get("geometry") or {})
    if kind == "FeatureCollection":
        geoms = [f.get("geometry") for f in obj.get("features", []) if f.get("geometry")]
        if not geoms:
            raise InvalidArgumentError("the FeatureCollection has no geometry")
        return {"type": "GeometryCollection", "geometries": geoms}
    _shape(obj)  # validates
    return dict(obj)


def _shape(geojson: Mapping[str, Any]) -> Any:
    """A valid shapely geometry from GeoJSON, or InvalidArgumentError."""
    import shapely
    from shapely.geometry import shape

    try:
        g = shape(geojson)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise InvalidArgumentError(f"not a GeoJSON geometry: {e}") from None
    if g.is_empty:
        raise InvalidArgumentError("the GeoJSON geometry is empty")
    if not g.is_valid:
        g = shapely.make_valid(g)
    minx, miny, maxx, maxy = g.bounds
    if not (-180 <= minx <= maxx <= 180 and -90 <= miny <= maxy <= 90):
        raise InvalidArgumentError("GeoJSON coordinates must be WGS84 longitude, latitude "
                                   "(RFC 7946)")
    return g


def _flat_labels(col: pd.Series) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Per row the number of labels, and every label as a code into the distinct labels."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = col.to_numpy(dtype=object)
    try:
        arr = pa.array(values, type=pa.list_(pa.string()), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # labels that are not strings: say them as text
        arr = pa.array([[str(x) for x in v] if v is not None else [] for v in values],
                       type=pa.list_(pa.string()))
    lens = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    enc = pc.dictionary_encode(arr.flatten())
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return lens.astype(np.int64), codes, enc.dictionary.to_pylist()


def _sorted_union(parts: list[np.ndarray]) -> np.ndarray:
    """Distinct rows of ascending groups, ascending (np.unique hashes: seconds at 10M)."""
    a = parts[0] if len(parts) == 1 else np.sort(np.concatenate(parts))
    return a[np.r_[True, a[1:] != a[:-1]]] if a.size else a


@dataclass(frozen=True)
class FilterIndex:
    """Vectorized views of an item table for filtering (built once per store generation)."""

    ids: np.ndarray
    label_rows: dict[str, np.ndarray]
    bounds: np.ndarray  # (N, 4) min_lon, min_lat, max_lon, max_lat; NaN when unknown
    footprints: np.ndarray  # (N,) WKB bytes or None
    times: np.ndarray  # (N,) int64 ns since epoch UTC; min int64 when unknown
    n: int

    @classmethod
    def of(cls, items: pd.DataFrame) -> FilterIndex:
        n = len(items)
        rows: dict[str, list[np.ndarray]] = {}
        # one factorize + one stable sort: O(n log n) whatever the number of classes
        codes, uniques = pd.factorize(items["label"].to_numpy(dtype=object), use_na_sentinel=True)
        if len(uniques):
            order = np.argsort(codes, kind="stable")
            bounds_ = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
            for c, lab in enumerate(uniques):
                rows.setdefault(str(lab), []).append(order[bounds_[c]:bounds_[c + 1]])
        # multi-labels through Arrow's list kernels: no Python loop over 10M items
        lens, codes, uniques = _flat_labels(items["labels"])
        if len(uniques):
            owner = np.repeat(np.arange(n), lens)
            order = np.argsort(codes, kind="stable")
            cut = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
            for c, lab in enumerate(uniques):
                rows.setdefault(str(lab), []).append(owner[order[cut[c]:cut[c + 1]]])
        label_rows = {k: _sorted_union(v) for k, v in rows.items()}
        cols = ("min_lon", "min_lat", "max_lon", "max_lat")
        bounds = np.column_stack([items[c].to_numpy(np.float64) for c in cols]) if n \
            else np.zeros((0, 4))
        times = items["datetime"].to_numpy("datetime64[ns]").astype(np.int64) if n \
            else np.zeros(0, np.int64)
        return cls(items["id"].to_numpy(np.int64), label_rows, bounds,
                   items["footprint"].to_numpy(dtype=object), times, n)


@dataclass(frozen=True)
class ItemFilter:
    """Which items a search may return (all given conditions must hold):

    ``labels`` — any of them (``label`` or ``labels``), or all of them with ``all_labels``;
    ``bbox`` — WGS84 ``(west, south, east, north)`` the footprint intersects; ``within`` — a GeoJSON
    geometry the footprint intersects; ``start``/``end`` — acquisition time range (inclusive);
    ``ids`` — only these item ids; ``exclude_ids`` — never these."""

    labels: tuple[str, ...] = ()
    all_labels: bool = False
    bbox: BBox | None = None
    within: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    start: pd.Timestamp | None = None
    end: pd.Timestamp | None = None
    ids: tuple[int, ...] | None = None
    exclude_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        if self.bbox is not None:
            object.__setattr__(self, "bbox", parse_bbox(self.bbox))
        if self.within is not None:
            object.__setattr__(self, "within", load_geometry(self.within))
        object.__setattr__(self, "start", parse_datetime(self.start))
        object.__setattr__(self, "end", parse_datetime(self.end, end=True))
        if self.start is not None and self.end is not None and self.start > self.end:
            raise InvalidArgumentError(f"start {self.start} is after end {self.end}")
        if self.ids is not None:
            object.__setattr__(self, "ids", tuple(int(i) for i in self.ids))
        object.__setattr__(self, "exclude_ids", tuple(int(i) for i in self.exclude_ids))

    def is_empty(self) -> bool:
        return (not self.labels and self.bbox is None and self.within is None
                and self.start is None and self.end is None and self.ids is None
                and not self.exclude_ids)

    def area(self) -> Any:
        """The spatial condition as one shapely geometry (box ∩ within), or None."""
        if self.bbox is None and self.within is None:
            return None
        import shapely
        from shapely.geometry import box

        parts = []
        if self.bbox is not None:
            w, s, e, n = self.bbox
            parts.append(box(w, s, e, n) if w <= e else
                         shapely.union(box(w, s, 180, n), box(-180, s, e, n)))
        if self.within is not None:
            parts.append(_shape(self.within))
        g = parts[0]
        for p in parts[1:]:
            g = shapely.intersection(g, p)
        return g

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for reports and the HTTP echo)."""
        return {"labels": list(self.labels), "all_labels": self.all_labels,
                "bbox": None if self.bbox is None else list(self.bbox), "within": self.within,
                "start": None if self.start is None else self.start.isoformat(),
                "end": None if self.end is None else self.end.isoformat(),
                "ids": None if self.ids is None else list(self.ids),
                "exclude_ids": list(self.exclude_ids)}

    def mask(self, items: pd.DataFrame | FilterIndex) -> np.ndarray:
        """Boolean (N,) of the items that pass (vectorized over a :class:`FilterIndex`)."""
        ix = items if isinstance(items, FilterIndex) else FilterIndex.of(items)
        keep = np.ones(ix.n, dtype=bool)
        if self.labels:
            sets = [ix.label_rows.get(lab, np.zeros(0, np.int64)) for lab in self.labels]
            lab = np.zeros(ix.n, bool)
            if self.all_labels:
                lab[:] = True
                for rows in sets:
                    has = np.zeros(ix.n, bool)
                    has[rows] = True
                    lab &= has
            else:
                for rows in sets:
                    lab[rows] = True
            keep &= lab
        if self.ids is not None:
            keep &= np.isin(ix.ids, np.asarray(self.ids, np.int64))
        if self.exclude_ids:
            keep &= ~np.isin(ix.ids, np.asarray(self.exclude_ids, np.int64))
        if self.start is not None or self.end is not None:
            known = ix.times != np.iinfo(np.int64).min
            t = ix.times
            if self.start is not None:
                known &= t >= self.start.value
            if self.end is not None:
                known &= t <= self.end.value
            keep &= known
        area = self.area()
        if area is not None:
            keep &= self._intersects(ix, area, keep)
        return keep

    @staticmethod
    def _intersects(ix: FilterIndex, area: Any, candidates: np.ndarray) -> np.ndarray:
        """Items whose footprint (or centre point) intersects ``area``: a bounding-box test for
        all, the exact geometry test for the candidates it keeps."""
        import shapely

        ax0, ay0, ax1, ay1 = area.bounds
        b = ix.bounds
        with np.errstate(invalid="ignore"):
            near = candidates & (b[:, 0] <= ax1) & (b[:, 2] >= ax0) & (b[:, 1] <= ay1) & \
                (b[:, 3] >= ay0)
        rows = np.flatnonzero(near)
        out = np.zeros(ix.n, bool)
        if not len(rows):
            return out
        fp = ix.footprints[rows]
        has_fp = np.array([f is not None for f in fp], bool)
        geoms = np.empty(len(rows), dtype=object)
        if has_fp.any():
            geoms[has_fp] = shapely.from_wkb(fp[has_fp].tolist())
        if (~has_fp).any():
            pts = b[rows[~has_fp]]
            geoms[~has_fp] = shapely.points(pts[:, 0], pts[:, 1])
        shapely.prepare(area)
        out[rows] = shapely.intersects(area, geoms)
        return out
