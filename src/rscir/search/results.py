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
from collections.abc import Sequence
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


def build_hits(meta: pd.DataFrame, scores: np.ndarray, *, first_rank: int = 1,
               sim_image: np.ndarray | None = None, sim_text: np.ndarray | None = None,
               norm_image: np.ndarray | None = None, norm_text: np.ndarray | None = None,
               ) -> list[Hit]:
    """Hits from item metadata (rows in rank order) and their per-hit numbers."""
    from shapely import from_wkb
    from shapely.geometry import mapping

    def col(a: np.ndarray | None, i: int) -> float | None:
        return None if a is None else _num(a[i])

    out = []
    for i, r in enumerate(meta.itertuples(index=False)):
        fp = getattr(r, "footprint", None)
        dt = getattr(r, "datetime", None)
        out.append(Hit(
            rank=first_rank + i, id=int(r.id), path=str(r.path), score=float(scores[i]),
            label=None if r.label is None else str(r.label),
            labels=[str(x) for x in r.labels],
            sim_image=clamp_cosine(col(sim_image, i)), sim_text=clamp_cosine(col(sim_text, i)),
            norm_image=col(norm_image, i), norm_text=col(norm_text, i),
            lon=_num(r.lon), lat=_num(r.lat),
            datetime=None if dt is None or pd.isna(dt) else pd.Timestamp(dt).isoformat(),
            crs=getattr(r, "crs", None),
            width=int(r.width) if int(r.width) >= 0 else None,
            height=int(r.height) if int(r.height) >= 0 else None,
            footprint=None if fp is None else dict(mapping(from_wkb(bytes(fp)))),
        ))
    return out


def score_decimals(scores: Sequence[float], lo: int = 4, hi: int = 12) -> int:
    """Fewest decimals (from ``lo``) at which consecutive distinct scores print differently."""
    vals = [float(s) for s in scores if math.isfinite(float(s))]
    for d in range(lo, hi + 1):
        text = [f"{v:.{d}f}" for v in vals]
        if all(a != b or x == y for a, b, x, y in zip(text, text[1:], vals, vals[1:],
                                                        strict=False)):
            return d
    return hi
