"""Metadata filters on search results, the same for every store.

A filter only restricts *which* items may be returned: WeiCom's normalization is always over the
whole archive (from the store's moments), so a filtered hit has exactly its unfiltered score.
The directory store applies :meth:`ItemFilter.mask` to its item table; the Postgres store
translates the same fields to SQL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class ItemFilter:
    """Any of ``labels`` (matches ``label`` or ``labels``) and a lon/lat bounding box
    ``(min_lon, min_lat, max_lon, max_lat)``."""

    labels: tuple[str, ...] = ()
    bbox: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.bbox is not None:
            x0, y0, x1, y1 = self.bbox
            if x0 > x1 or y0 > y1:
                raise InvalidArgumentError("bbox must be (min_lon, min_lat, max_lon, max_lat)")

    def is_empty(self) -> bool:
        return not self.labels and self.bbox is None

    def mask(self, items: pd.DataFrame) -> np.ndarray:
        """Boolean (N,) of the rows of ``items`` that pass."""
        keep = np.ones(len(items), dtype=bool)
        if self.labels:
            want = set(self.labels)
            single = items["label"].isin(want).to_numpy()
            multi = np.fromiter((bool(want.intersection(v)) for v in items["labels"]), bool,
                                len(items))
            keep &= single | multi
        if self.bbox is not None:
            x0, y0, x1, y1 = self.bbox
            lon, lat = items["lon"].to_numpy(), items["lat"].to_numpy()
            keep &= (lon >= x0) & (lon <= x1) & (lat >= y0) & (lat <= y1)
        return keep
