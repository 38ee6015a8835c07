"""Where and when an item is: footprints of pixel windows, and acquisition times.

Footprints are computed for many windows of one raster at once (numpy corners, one pyproj call,
vectorized shapely), as polygons in the raster's CRS and in WGS84 (lon, lat order), with the
centre point of each window as lon/lat. A window that runs past the raster's edge (a padded
chip) has the footprint of its pixels inside the raster.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class Footprints:
    """Per window: centre lon/lat (WGS84), WKB polygons in WGS84 and in the native CRS."""

    lon: np.ndarray
    lat: np.ndarray
    wgs84: list[bytes | None]
    native: list[bytes | None]
    crs: str | None


@functools.lru_cache(maxsize=16)
def _to_wgs84(crs_wkt: str) -> Any:
    from pyproj import Transformer

    return Transformer.from_crs(crs_wkt, "EPSG:4326", always_xy=True)


def crs_name(crs: Any) -> str | None:
    """``EPSG:32633`` where the CRS has an EPSG code, else its WKT; None when unknown."""
    if crs is None:
        return None
    try:
        epsg = crs.to_epsg()
    except Exception:  # noqa: BLE001 - exotic CRS: fall back to WKT
        epsg = None
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def window_footprints(transform: Any, crs: Any, windows: np.ndarray,
                      shape: tuple[int, int] | None = None) -> Footprints:
    """Footprints of pixel ``windows`` (n, 4: col, row, width, height) of a raster with this
    affine ``transform`` and ``crs`` (rasterio objects); ``shape`` = (height, width) clips
    windows to the raster. Without a CRS or with an identity transform, nothing is known."""
    import shapely

    w = np.asarray(windows, np.float64).reshape(-1, 4)
    n = len(w)
    if crs is None or transform is None or transform.is_identity:
        nan = np.full(n, np.nan)
        return Footprints(nan, nan.copy(), [None] * n, [None] * n, None)
    c0, r0 = w[:, 0], w[:, 1]
    c1, r1 = c0 + w[:, 2], r0 + w[:, 3]
    if shape is not None:
        c1 = np.minimum(c1, shape[1])
        r1 = np.minimum(r1, shape[0])
    cols = np.stack([c0, c1, c1, c0, (c0 + c1) / 2], axis=1)  # 4 corners + centre
    rows = np.stack([r0, r0, r1, r1, (r0 + r1) / 2], axis=1)
    t = transform
    xs = t.a * cols + t.b * rows + t.c
    ys = t.d * cols + t.e * rows + t.f
    native = shapely.polygons(np.stack([xs[:, :4], ys[:, :4]], axis=-1))
    lon, lat = _to_wgs84(crs.to_wkt()).transform(xs.ravel(), ys.ravel())
    lon = np.asarray(lon).reshape(n, 5)
    lat = np.asarray(lat).reshape(n, 5)
    wgs = shapely.polygons(np.stack([lon[:, :4], lat[:, :4]], axis=-1))
    return Footprints(lon[:, 4].copy(), lat[:, 4].copy(), list(shapely.to_wkb(wgs)),
                      list(shapely.to_wkb(native)), crs_name(crs))


# --------------------------------------------------------------------------- acquisition time
DATETIME_TAGS = ("ACQUISITIONDATETIME", "ACQUISITION_DATETIME", "ACQUISITION_DATE",
                 "DATETIME", "datetime", "SENSING_TIME", "PRODUCT_START_TIME",
                 "TIFFTAG_DATETIME")


def to_utc_iso(value: Any) -> str | None:
    """A time (string in ISO or TIFF ``YYYY:MM:DD HH:MM:SS`` form, datetime, Timestamp) as an
    ISO string in UTC; naive times are taken as UTC. None when unparseable."""
    import pandas as pd

    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str):
        s = value.strip()
        m = re.fullmatch(r"(\d{4}):(\d{2}):(\d{2})[ T](\d{2}:\d{2}:\d{2})", s)
        if m:  # the TIFF DateTime tag's own form
            s = f"{m[1]}-{m[2]}-{m[3]}T{m[4]}"
        value = s
    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError, OverflowError):
        return None
    if ts is pd.NaT:
        return None
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.isoformat()


def tag_datetime(tags: Mapping[str, str]) -> str | None:
    """The acquisition time a raster's metadata tags carry (first of :data:`DATETIME_TAGS`).

    ``TIFFTAG_DATETIME`` comes last: it is when the file was written, which is the acquisition
    time only for some producers; ``--datetime-from`` overrides it."""
    for k in DATETIME_TAGS:
        if k in tags and tags[k]:
            t = to_utc_iso(tags[k])
            if t is not None:
                return t
    return None


_STRF = {"%Y": r"\d{4}", "%m": r"\d{2}", "%d": r"\d{2}", "%H": r"\d{2}", "%M": r"\d{2}",
         "%S": r"\d{2}", "%j": r"\d{3}", "%y": r"\d{2}", "%%": "%"}


@dataclass(frozen=True)
class FilenameTime:
    """``--datetime-from PATTERN``: a strftime pattern (``%Y%m%dT%H%M%S``) searched for in each
    file name (then in its folders), e.g. Sentinel-2 ``..._20230601T101559_...`` names."""

    pattern: str

    @functools.cached_property
    def regex(self) -> re.Pattern[str]:
        parts = re.split(r"(%[YmdHMSjy%])", self.pattern)
        if not any(p in _STRF for p in parts):
            raise InvalidArgumentError(
                f"--datetime-from {self.pattern!r} has no date field (%Y, %m, %d, %j ...)")
        rx = "".join(_STRF[p] if p in _STRF else re.escape(p) for p in parts)
        return re.compile(f"({rx})")

    def parse(self, path: str) -> str | None:
        for part in reversed(PurePosixPath(path.split("#", 1)[0]).parts):
            for m in self.regex.finditer(part):
                try:
                    dt = datetime.strptime(m.group(1), self.pattern)
                except ValueError:
                    continue
                return dt.replace(tzinfo=timezone.utc).isoformat()
        return None

    def parse_many(self, paths: Sequence[str]) -> list[str | None]:
        return [self.parse(p) for p in paths]
