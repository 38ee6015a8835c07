"""Search results as people and GIS tools read them: hits with where, when and why they matched.

A :class:`Hit` carries the fused score and, to explain it, the image and text cosine
similarities (clamped to [−1, 1]: float16 storage can round a cosine of 1 to 1.00004) and, for
WeiCom, their normalized values Φ(z) — the share of the archive each similarity beats. Where an
item is known, the hit carries its WGS84 footprint (GeoJSON geometry), centre, CRS and
acquisition time. :func:`score_decimals` picks how many decimals make ranked scores distinct
(WeiCom scores crowd near 1: 0.99987 vs 0.99991).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

HIT_COLUMNS = ("rank", "id", "path", "score", "label", "labels", "sim_image", "sim_text",
               "norm_image", "norm_text", "lon", "lat", "datetime", "crs", "width", "height",
               "footprint")


@dataclass(frozen=True)
class Hit:
    rank: int
    id: int
    path: str
    score: float
    label: str | None = None
    labels: list[str] = field(default_factory=list)
    sim_image: float | None = None
    sim_text: float | None = None
    norm_image: float | None = None
    norm_text: float | None = None
    lon: float | None = None
    lat: float | None = None
    datetime: str | None = None
    crs: str | None = None
    width: int | None = None
    height: int | None = None
    footprint: dict[str, Any] | None = None

    def geometry(self) -> dict[str, Any] | None:
        """GeoJSON geometry: the footprint polygon, else the centre point, else None."""
        if self.footprint is not None:
            return self.footprint
        if self.lon is not None and self.lat is not None:
            return {"type": "Point", "coordinates": [self.lon, self.lat]}
        return None


@dataclass
class SearchResult:
    hits: list[Hit]
    method: str
    lam: float
    texts: list[str] = field(default_factory=list)
    query_id: int | None = None
    offset: int = 0

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(h) for h in self.hits], columns=list(HIT_COLUMNS))

    def to_records(self) -> list[dict[str, Any]]:
        return [asdict(h) for h in self.hits]


def _num(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def clamp_cosine(v: float | None) -> float | None:
    return None if v is None else min(1.0, max(-1.0, v))


# the item columns a hit is built from
META_COLUMNS = ("id", "path", "label", "labels", "lon", "lat", "datetime", "crs", "width",
                "height", "footprint")


def _floats(a: np.ndarray | None, n: int, clamp: bool = False) -> list[float | None]:
    """Per-hit numbers as Python floats, None where absent or not finite (cosines clamped)."""
    if a is None:
        return [None] * n
    v = np.asarray(a, np.float64)[:n]
    ok = np.isfinite(v)
    if clamp:
        v = np.clip(v, -1.0, 1.0)
    return [x if good else None for x, good in zip(v.tolist(), ok.tolist(), strict=True)]


def _text(v: Any) -> str | None:
    """A text cell: None when missing (None or a NaN that a string column reads back)."""
    return None if v is None or (isinstance(v, float) and v != v) else str(v)


def _footprints(wkb: Sequence[Any]) -> list[dict[str, Any] | None]:
    """GeoJSON geometries of WKB cells (parsed in one call), None where absent."""
    has = [i for i, v in enumerate(wkb) if v is not None]
    out: list[dict[str, Any] | None] = [None] * len(wkb)
    if has:
        from shapely import from_wkb  # not at import: keeps `rscir` start-up fast
        from shapely.geometry import mapping

        for i, g in zip(has, from_wkb([bytes(wkb[i]) for i in has]), strict=True):
            out[i] = dict(mapping(g))
    return out


def build_hits(meta: pd.DataFrame | Mapping[str, Sequence[Any]], scores: np.ndarray, *,
               first_rank: int = 1, sim_image: np.ndarray | None = None,
               sim_text: np.ndarray | None = None, norm_image: np.ndarray | None = None,
               norm_text: np.ndarray | None = None) -> list[Hit]:
    """Hits from item metadata in rank order (a frame, or the lists of
    :meth:`~rscir.stores.base.EmbeddingStore.columns_for_ids` for :data:`META_COLUMNS`) and
    their per-hit numbers; column-wise, with no per-row pandas access."""
    if isinstance(meta, pd.DataFrame):
        meta = {c: meta[c].tolist() for c in META_COLUMNS if c in meta}
    ids = meta["id"]
    n = len(ids)
    none = [None] * n
    dts = meta.get("datetime", none)
    fps = meta.get("footprint")
    return [
        Hit(rank=first_rank + i, id=int(iid), path=str(path), score=float(sc), label=_text(lab),
            labels=[str(x) for x in labs], sim_image=si, sim_text=st, norm_image=ni,
            norm_text=nt, lon=_num(lon), lat=_num(lat),
            datetime=None if dt is None or pd.isna(dt) else pd.Timestamp(dt).isoformat(),
            crs=crs, width=int(w) if int(w) >= 0 else None,
            height=int(h) if int(h) >= 0 else None, footprint=fp)
        for i, (iid, path, sc, lab, labs, si, st, ni, nt, lon, lat, dt, crs, w, h, fp)
        in enumerate(zip(
            ids, meta["path"], np.asarray(scores, np.float64)[:n].tolist(), meta["label"],
            meta["labels"], _floats(sim_image, n, True), _floats(sim_text, n, True),
            _floats(norm_image, n), _floats(norm_text, n), meta["lon"], meta["lat"], dts,
            meta.get("crs", none), meta["width"], meta["height"],
            none if fps is None else _footprints(fps), strict=True))
    ]


def score_decimals(scores: Sequence[float], lo: int = 4, hi: int = 12) -> int:
    """Fewest decimals (from ``lo``) at which consecutive distinct scores print differently."""
    vals = [float(s) for s in scores if math.isfinite(float(s))]
    for d in range(lo, hi + 1):
        text = [f"{v:.{d}f}" for v in vals]
        if all(a != b or x == y for a, b, x, y in zip(text, text[1:], vals, vals[1:],
                                                        strict=False)):
            return d
    return hi
