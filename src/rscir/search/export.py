"""Search results as files a GIS opens: GeoJSON (RFC 7946), CSV, GeoParquet, or JSON.

One row (or Feature) per hit and λ, with rank, fused score, image and text similarity (and their
normalized values for WeiCom), id, path, labels, time and place. Geometry is the hit's WGS84
footprint polygon, or its centre point when only that is known, or null.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import InvalidArgumentError
from .results import SearchResult

FORMATS = ("json", "geojson", "csv", "parquet")
MEDIA_TYPES = {"json": "application/json", "geojson": "application/geo+json",
               "csv": "text/csv", "parquet": "application/vnd.apache.parquet"}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return fmt


def _props(r: SearchResult, h: Any) -> dict[str, Any]:
    d = asdict(h)
    d.pop("footprint")
    d["labels"] = ";".join(d["labels"])
    # "crs" reads as the obsolete GeoJSON member to GDAL: name it for what it is
    d["source_crs"] = d.pop("crs")
    return {"lam": r.lam, "method": r.method, **d}


def to_geojson(results: Sequence[SearchResult], query: dict[str, Any] | None = None,
               ) -> dict[str, Any]:
    """A FeatureCollection: one Feature per hit and λ (the Feature ``id`` is the item id for
    one λ; with several λ an item recurs, so ids live in the properties only)."""
    many = len(results) > 1
    feats = [{"type": "Feature", **({} if many else {"id": h.id}),
              "geometry": h.geometry(), "properties": _props(r, h)}
             for r in results for h in r.hits]
    out: dict[str, Any] = {"type": "FeatureCollection", "features": feats}
    if query is not None:
        out["rscir_query"] = query  # a foreign member (RFC 7946 §6.1): what was asked
    return out


def to_frame(results: Sequence[SearchResult]) -> pd.DataFrame:
    """A flat table (geometry as WKT) of every hit and λ."""
    from shapely.geometry import shape

    rows = []
    for r in results:
        for h in r.hits:
            g = h.geometry()
            rows.append({**_props(r, h), "geometry_wkt": None if g is None else shape(g).wkt})
    return pd.DataFrame(rows)


def to_geodataframe(results: Sequence[SearchResult]) -> Any:
    """A GeoDataFrame in EPSG:4326 (what GeoParquet export writes)."""
    import geopandas as gpd
    from shapely.geometry import shape

    rows, geoms = [], []
    for r in results:
        for h in r.hits:
            rows.append(_props(r, h))
            g = h.geometry()
            geoms.append(None if g is None else shape(g))
    return gpd.GeoDataFrame(pd.DataFrame(rows), geometry=geoms, crs="EPSG:4326")


def to_json(results: Sequence[SearchResult], query: dict[str, Any]) -> dict[str, Any]:
    return {"query": query,
            "results": [{"lam": r.lam, "method": r.method, "offset": r.offset,
                         "hits": r.to_records()} for r in results]}


def render(results: Sequence[SearchResult], fmt: str, query: dict[str, Any]) -> bytes:
    """The results in one format, as the bytes of a file."""
    check_format(fmt)
    if fmt == "json":
        return (json.dumps(to_json(results, query), indent=1, default=str) + "\n").encode()
    if fmt == "geojson":
        return json.dumps(to_geojson(results, query), default=str).encode()
    if fmt == "csv":
        return to_frame(results).to_csv(index=False).encode()
    buf = io.BytesIO()
    to_geodataframe(results).to_parquet(buf, index=False)
    return buf.getvalue()


def write(results: Sequence[SearchResult], fmt: str, out: str | os.PathLike[str],
          query: dict[str, Any]) -> Path:
    """Write the results to ``out`` atomically (a temp file renamed into place)."""
    return write_bytes(render(results, fmt, query), out)


def write_bytes(data: bytes, out: str | os.PathLike[str]) -> Path:
    p = Path(out)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)
    return p
