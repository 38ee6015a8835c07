"""STAC catalogs and ItemCollections as archives (pystac).

``rscir index catalog.json|items.geojson --asset visual`` reads a STAC Catalog or Collection
(items found by following its links), an ItemCollection (a GeoJSON FeatureCollection of items)
or a single Item. Of each item it takes one asset (``--asset KEY``; default ``visual`` when
there is one), or one asset per band (``--bands red,green,blue``: asset keys, or the
``eo:bands`` names/common names of single-band assets), and keeps the item's datetime (or
``start_datetime``) and geometry. The archive root is the catalog file's folder: an asset
inside it gets a relative item path (and thumbnails), others keep their absolute path or URL
(remote hrefs are read through GDAL's ``/vsicurl/`` when reachable). Scenes are chipped with
``--chip-size`` as any raster; a chip's footprint comes from the asset's georeferencing, the
item's geometry is used where the asset has none.

The STAC item id of every source is written to the store's ``artifacts/ingest/sources.jsonl``
(with the band files of multi-asset items, which thumbnails read).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError, MissingDependencyError
from .geo import to_utc_iso
from .units import Source

log = logging.getLogger(__name__)

STAC_SUFFIXES = (".json", ".geojson")


def is_stac_file(path: Path) -> bool:
    """A JSON file that is a STAC Catalog, Collection, Item or ItemCollection."""
    if not path.is_file() or path.suffix.lower() not in STAC_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16).decode("utf-8", "replace")
    except OSError:
        return False
    return "stac_version" in head or '"FeatureCollection"' in head


@dataclass
class StacArchive:
    root: Path
    sources: list[Source]
    ignored: list[tuple[str, str]]
    ids: dict[str, str]  # source path -> STAC item id


def _items(path: Path) -> list[Any]:
    try:
        import pystac
    except ImportError as e:
        raise MissingDependencyError(
            "reading STAC needs the Python package 'pystac': pip install pystac") from e
    d = json.loads(path.read_text())
    kind = d.get("type")
    if kind == "FeatureCollection":
        return list(pystac.ItemCollection.from_dict(d, preserve_dict=False, root=None))
    obj = pystac.read_file(str(path))
    if isinstance(obj, pystac.Item):
        return [obj]
    if isinstance(obj, pystac.Catalog):
        return list(obj.get_items(recursive=True))
    raise InvalidArgumentError(f"{path}: not a STAC Catalog, Collection, Item or ItemCollection")


def _band_assets(item: Any, bands: Sequence[str | int]) -> list[Any] | None:
    """One single-band asset per requested band, by asset key or eo:bands name/common name."""
    out = []
    for b in bands:
        key = str(b)
        a = item.assets.get(key)
        if a is None:
            for asset in item.assets.values():
                eo = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
                if len(eo) == 1 and key.lower() in {str(eo[0].get("name", "")).lower(),
                                                    str(eo[0].get("common_name", "")).lower()}:
                    a = asset
                    break
        if a is None:
            return None
        out.append(a)
    return out


def _href(asset: Any, item: Any, root: Path) -> str:
    """The asset's path relative to ``root`` when inside it, else absolute (or its URL).
    Relative hrefs are relative to the item's own file, or to the ItemCollection's folder."""
    href = str(asset.href)
    if "://" in href and not href.startswith("file://"):
        return href
    href = href.removeprefix("file://")
    if not os.path.isabs(href):
        self_href = item.get_self_href()
        base = Path(self_href).parent if self_href and "://" not in self_href else root
        href = os.fspath(base / href)
    p = Path(href).resolve()
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return os.fspath(p)


def scan(path: Path, asset: str | None, bands: Sequence[str | int] | None) -> StacArchive:
    """The sources of a STAC file: one per item (its asset, or its band assets)."""
    import shapely
    from shapely.geometry import shape

    root = path.parent.resolve()
    sources: list[Source] = []
    ignored: list[tuple[str, str]] = []
    ids: dict[str, str] = {}
    for item in _items(path):
        files: tuple[str, ...] = ()
        if asset is not None:
            a = item.assets.get(asset)
            if a is None:
                ignored.append((item.id, f"no asset {asset!r} (has: {', '.join(item.assets)})"))
                continue
            rel = _href(a, item, root)
        elif bands and len(bands) in (1, 3) and (bas := _band_assets(item, bands)) is not None:
            files = tuple(_href(a, item, root) for a in bas)
            rel = files[0] if len(files) == 1 else f"{files[0]}#item={item.id}"
            if len(files) == 1:
                files = ()
        elif "visual" in item.assets:
            rel = _href(item.assets["visual"], item, root)
        else:
            ignored.append((item.id, "choose an asset with --asset KEY (has: "
                            f"{', '.join(item.assets)})"))
            continue
        local = root / rel.split("#", 1)[0] if "://" not in rel else None
        size, mtime = -1, -1
        if local is not None:
            try:
                st = local.stat()
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                ignored.append((item.id, f"asset file missing: {rel}"))
                continue
        dt = item.datetime or item.common_metadata.start_datetime
        extra: dict[str, Any] = {"label": None, "datetime": to_utc_iso(dt)}
        if item.geometry:
            g = shape(item.geometry)
            c = g.centroid
            extra.update(footprint=bytes(shapely.to_wkb(g)), lon=float(c.x), lat=float(c.y))
        sources.append(Source(rel, size, mtime, files, extra))
        ids[rel] = item.id
    return StacArchive(root, sources, ignored, ids)
