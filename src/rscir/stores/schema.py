"""What a store holds about each item, defined once for every backend.

Each :class:`Column` names its pandas dtype, its default and its PostgreSQL type, so the directory
store (Parquet) and the Postgres store (a table) hold the same metadata, and adding a column is one
line here. :class:`Manifest` is the store's identity: model, dimension, dtype, archive root.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .._version import __version__
from ..encoders.base import ModelInfo
from ..errors import InvalidArgumentError

FORMAT_VERSION = 1
DTYPES: dict[str, type[np.floating[Any]]] = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class Column:
    """One metadata column: pandas dtype, default for items that lack it, SQL type."""

    name: str
    dtype: str
    default: Any
    sql: str


COLUMNS: tuple[Column, ...] = (
    Column("id", "int64", -1, "bigint PRIMARY KEY"),
    Column("path", "object", None, "text NOT NULL UNIQUE"),
    Column("size", "int64", -1, "bigint NOT NULL"),
    Column("mtime_ns", "int64", -1, "bigint NOT NULL"),
    Column("width", "int64", -1, "integer NOT NULL"),
    Column("height", "int64", -1, "integer NOT NULL"),
    Column("label", "object", None, "text"),
    Column("labels", "object", None, "text[] NOT NULL DEFAULT '{}'"),
    Column("lon", "float64", np.nan, "double precision"),  # centre of the footprint, WGS84
    Column("lat", "float64", np.nan, "double precision"),
    Column("datetime", "datetime64[ns, UTC]", pd.NaT, "timestamptz"),  # acquisition time
    Column("crs", "object", None, "text"),  # the source raster's CRS ("EPSG:32633")
    Column("footprint", "object", None, "bytea"),  # WKB polygon in WGS84, (lon, lat) order
    Column("footprint_native", "object", None, "bytea"),  # WKB polygon in ``crs``
    # the WGS84 footprint's bounds (the centre point's when there is no footprint): derived on
    # write, so both backends filter by area without parsing geometries
    Column("min_lon", "float64", np.nan, "double precision"),
    Column("min_lat", "float64", np.nan, "double precision"),
    Column("max_lon", "float64", np.nan, "double precision"),
    Column("max_lat", "float64", np.nan, "double precision"),
)
ITEM_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS)
REQUIRED_COLUMNS: tuple[str, ...] = ("id", "path")  # older stores lack the later ones
_INT_COLUMNS = tuple(c.name for c in COLUMNS if c.dtype == "int64")
_FLOAT_COLUMNS = tuple(c.name for c in COLUMNS if c.dtype == "float64")
_WKB_COLUMNS = ("footprint", "footprint_native")


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return dtype


def empty_items() -> pd.DataFrame:
    return pd.DataFrame({c.name: pd.Series(dtype=c.dtype) for c in COLUMNS})


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NaT


def to_wkb(v: Any) -> bytes | None:
    """A geometry as WKB bytes: from WKB, a shapely geometry, WKT, or a GeoJSON mapping."""
    if _is_missing(v):
        return None
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v)
    import shapely

    if isinstance(v, str):
        g = shapely.from_wkt(v)
    elif isinstance(v, dict):
        from shapely.geometry import shape

        g = shape(v)
    else:
        g = v
    return bytes(shapely.to_wkb(g))


def normalize_items(items: pd.DataFrame | list[dict[str, Any]]) -> pd.DataFrame:
    """Coerce item metadata to the store's columns and dtypes (missing columns get defaults)."""
    df = pd.DataFrame(list(items)) if isinstance(items, list) else items.copy()
    if len(df) == 0 and "path" not in df:
        df = pd.DataFrame({"path": pd.Series(dtype=object)})
    n = len(df)
    if "path" not in df:
        raise InvalidArgumentError("items need a 'path' column")
    for c in COLUMNS:
        if c.name not in df and c.name != "labels":
            df[c.name] = [c.default] * n
    if "labels" not in df:
        df["labels"] = [[] for _ in range(n)]
    df["labels"] = [list(v) if isinstance(v, list | tuple | np.ndarray) else [] for v in df["labels"]]
    df["label"] = [None if _is_missing(v) else str(v) for v in df["label"]]
    df["path"] = df["path"].astype(str)
    for col in _INT_COLUMNS:
        df[col] = pd.to_numeric(df[col]).fillna(-1).astype("int64")
    for col in _FLOAT_COLUMNS:
        df[col] = pd.to_numeric(df[col]).astype("float64")
    df["datetime"] = pd.to_datetime(df["datetime"], utc=True, errors="coerce").astype(
        "datetime64[ns, UTC]")
    df["crs"] = [None if _is_missing(v) else str(v) for v in df["crs"]]
    for col in _WKB_COLUMNS:
        df[col] = [to_wkb(v) for v in df[col]] if df[col].notna().any() else [None] * n
    _derive_bounds(df)
    return df[list(ITEM_COLUMNS)].reset_index(drop=True)


def _derive_bounds(df: pd.DataFrame) -> None:
    """min/max lon/lat from the WGS84 footprint, else from the centre point (vectorized)."""
    lon, lat = df["lon"].to_numpy(np.float64), df["lat"].to_numpy(np.float64)
    b = np.column_stack([lon, lat, lon, lat])
    fp = df["footprint"].to_numpy(dtype=object)
    has = np.array([v is not None for v in fp], bool)
    if has.any():
        import shapely

        b[has] = shapely.bounds(shapely.from_wkb(fp[has].tolist()))
    for i, c in enumerate(("min_lon", "min_lat", "max_lon", "max_lat")):
        df[c] = b[:, i]


@dataclass(frozen=True)
class Manifest:
    """A store's identity: the model whose space it holds, the dimension and dtype of its
    vectors, the archive root its item paths are relative to, and the writing rscir version."""

    model: ModelInfo
    dim: int
    dtype: str
    root: str
    rscir_version: str = __version__
    format_version: int = FORMAT_VERSION
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        return cls(
            model=ModelInfo.from_dict(d["model"]),
            dim=int(d["dim"]),
            dtype=str(d["dtype"]),
            root=str(d["root"]),
            rscir_version=str(d.get("rscir_version", "?")),
            format_version=int(d.get("format_version", FORMAT_VERSION)),
            created=float(d.get("created", 0.0)),
        )
