"""Generated geospatial archives for the ingestion tests (torchgeo-style fake data): GeoTIFF
scenes and mosaics, a Sentinel-2-like 12-band scene, BigEarthNet v1/v2 patches in their exact
layouts, a STAC ItemCollection and Catalog."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

UTM33 = "EPSG:32633"
ORIGIN = (500_000.0, 5_000_000.0)
BIGEARTHNET_BANDS = {"B01": 20, "B02": 120, "B03": 120, "B04": 120, "B05": 60, "B06": 60,
                     "B07": 60, "B08": 120, "B8A": 60, "B09": 20, "B11": 60, "B12": 60}


def write_geotiff(path: Path, data: np.ndarray, *, crs: str | None = UTM33,
                  origin: tuple[float, float] = ORIGIN, res: float = 10.0,
                  nodata: float | None = None, tags: dict[str, str] | None = None,
                  descriptions: Sequence[str] | None = None, tiled: bool = True) -> Path:
    """(C, H, W) array → a (tiled, deflated) GeoTIFF north-up at ``origin`` with ``res`` m."""
    import rasterio
    from rasterio.transform import from_origin

    path.parent.mkdir(parents=True, exist_ok=True)
    c, h, w = data.shape
    profile: dict[str, Any] = dict(driver="GTiff", width=w, height=h, count=c,
                                   dtype=str(data.dtype), compress="deflate")
    if crs is not None:
        profile.update(crs=crs, transform=from_origin(origin[0], origin[1], res, res))
    if nodata is not None:
        profile["nodata"] = nodata
    if tiled and w >= 16 and h >= 16:
        profile.update(tiled=True, blockxsize=16 * max(1, min(w, 256) // 16),
                       blockysize=16 * max(1, min(h, 256) // 16))
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        if tags:
            ds.update_tags(**tags)
        for i, d in enumerate(descriptions or (), start=1):
            ds.set_band_description(i, d)
    return path


def ucm_tiles(images: Path, n: int, size: int) -> list[np.ndarray]:
    """``n`` real UC Merced tiles (one class each, sorted), cropped to size × size RGB."""
    classes = sorted(p for p in images.iterdir() if p.is_dir())[:n]
    out = []
    for c in classes:
        f = sorted(c.glob("*.jpg"))[0]
        out.append(np.asarray(Image.open(f).convert("RGB"))[:size, :size].copy())
    return out


def ucm_mosaic(path: Path, tiles: list[np.ndarray], cols: int, rows: int, *,
               empty_cell: int | None = None, extra_cols: int = 0, res: float = 0.3
               ) -> dict[tuple[int, int], np.ndarray]:
    """A UTM 33N mosaic of tiles in a grid (row by row; ``empty_cell`` left nodata = 0, and
    ``extra_cols`` nodata columns at the right); returns the tile at each (col, row) cell."""
    size = tiles[0].shape[0]
    data = np.zeros((3, rows * size, cols * size + extra_cols), np.uint8)
    placed: dict[tuple[int, int], np.ndarray] = {}
    k = 0
    for r in range(rows):
        for c in range(cols):
            if r * cols + c == empty_cell:
                continue
            t = tiles[k % len(tiles)]
            k += 1
            data[:, r * size:(r + 1) * size, c * size:(c + 1) * size] = t.transpose(2, 0, 1)
            placed[(c, r)] = t
    write_geotiff(path, data, res=res, nodata=0,
                  tags={"TIFFTAG_DATETIME": "2021:06:01 10:30:00"})
    return placed


def s2_scene(path: Path, width: int, height: int, *, descriptions: bool = False,
             seed: int = 0) -> np.ndarray:
    """A 12-band uint16 Sentinel-2 L2A-like scene (B01..B12 with B8A; DN = ρ × 10000): band
    ``k`` (0-based) holds ``(k + 1) * 200`` plus noise, and the last 30 rows are nodata (0)."""
    rng = np.random.default_rng(seed)
    data = ((np.arange(1, 13) * 200)[:, None, None]
            + rng.integers(0, 50, (12, height, width))).astype(np.uint16)
    data[:, height - 30:, :] = 0
    from rscir.ingest.sensors import S2_L2A

    write_geotiff(path, data, nodata=0, descriptions=S2_L2A if descriptions else None,
                  tags={"ACQUISITION_DATETIME": "2022-07-14T10:20:31Z"})
    return data


# --------------------------------------------------------------------------- BigEarthNet
PATCHES = [  # (tile product, row, col, 43-class labels)
    ("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP", 26, 57,
     ["Non-irrigated arable land", "Pastures", "Sea and ocean"]),
    ("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP", 26, 58,
     ["Non-irrigated arable land", "Pastures"]),
    ("S2B_MSIL2A_20180204T94161_N9999_R036_T35ULA", 3, 4,
     ["Coniferous forest", "Mixed forest", "Transitional woodland/shrub"]),
    ("S2B_MSIL2A_20180204T94161_N9999_R036_T35ULA", 3, 5,
     ["Discontinuous urban fabric", "Airports", "Water bodies"]),
]


def _patch_bands(root: Path, rel: str, name: str, seed: int, origin: tuple[float, float]
                 ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for b, n in BIGEARTHNET_BANDS.items():
        arr = rng.integers(100, 2900, (1, n, n)).astype(np.uint16)
        write_geotiff(root / rel / f"{name}_{b}.tif", arr, origin=origin, res=1200.0 / n,
                      tiled=False)
        out[b] = arr[0]
    return out


def bigearthnet_v1(root: Path) -> dict[str, dict[str, Any]]:
    """BigEarthNet-S2 v1.0: ``root/<patch>/<patch>_B??.tif`` + ``_labels_metadata.json``."""
    out = {}
    for k, (tile, r, c, labels) in enumerate(PATCHES):
        name = f"{tile}_{r}_{c}"
        origin = (600_000.0 + 1200 * c, 5_000_000.0 - 1200 * r)
        bands = _patch_bands(root, name, name, k, origin)
        date = tile.split("_")[2]
        meta = {"labels": labels,
                "coordinates": {"ulx": origin[0], "uly": origin[1], "lrx": origin[0] + 1200,
                                "lry": origin[1] - 1200},
                "projection": "EPSG:32633", "tile_source": tile.replace("L2A", "L1C"),
                "acquisition_date": f"{date[:4]}-{date[4:6]}-{date[6:8]} 10:10:31"}
        (root / name / f"{name}_labels_metadata.json").write_text(json.dumps(meta))
        out[name] = {"bands": bands, "labels": labels, "origin": origin}
    return out


def bigearthnet_v2(root: Path) -> dict[str, dict[str, Any]]:
    """reBEN: ``root/metadata.parquet`` + ``root/BigEarthNet-S2/<tile>/<patch>/<patch>_B??.tif``
    with the 19-class labels."""
    import pandas as pd

    from rscir.ingest.bigearthnet import to_19

    out, rows = {}, []
    for k, (tile, r, c, labels) in enumerate(PATCHES):
        name = f"{tile}_{r}_{c}"
        origin = (600_000.0 + 1200 * c, 5_000_000.0 - 1200 * r)
        bands = _patch_bands(root, f"BigEarthNet-S2/{tile}/{name}", name, 10 + k, origin)
        labels19 = to_19(labels)
        rows.append({"patch_id": name, "labels": labels19, "split": "train",
                     "country": "Austria", "s1_name": f"S1_{name}", "s2v1_name": name,
                     "contains_seasonal_snow": False, "contains_cloud_or_shadow": False})
        out[name] = {"bands": bands, "labels": labels19, "origin": origin}
    pd.DataFrame(rows).to_parquet(root / "metadata.parquet")
    return out


# --------------------------------------------------------------------------- STAC
def stac_items(root: Path, n: int = 2, size: int = 200) -> list[dict[str, Any]]:
    """Items with a 3-band uint8 ``visual`` GeoTIFF asset and single-band B02/B03/B04 assets."""
    import pystac
    from pyproj import Transformer
    from shapely.geometry import box, mapping

    t = Transformer.from_crs(UTM33, "EPSG:4326", always_xy=True)
    rng = np.random.default_rng(3)
    items = []
    for i in range(n):
        iid = f"S2_T33UUP_2023060{i + 1}_L2A"
        origin = (500_000.0 + 5000 * i, 5_000_000.0)
        rgb = rng.integers(1, 255, (3, size, size)).astype(np.uint8)
        d = root / "items" / iid
        write_geotiff(d / "visual.tif", rgb, origin=origin)
        for b, k in (("B04", 0), ("B03", 1), ("B02", 2)):
            write_geotiff(d / f"{b}.tif", (rgb[k:k + 1].astype(np.uint16) * 10), origin=origin)
        x0, y1 = origin
        x1, y0 = x0 + size * 10, y1 - size * 10
        lon, lat = t.transform([x0, x1, x1, x0], [y0, y0, y1, y1])
        geom = box(min(lon), min(lat), max(lon), max(lat))
        item = pystac.Item(iid, mapping(geom), list(geom.bounds),
                           pystac.utils.str_to_datetime(f"2023-06-0{i + 1}T10:20:30Z"), {})
        item.add_asset("visual", pystac.Asset(f"./items/{iid}/visual.tif",
                                              media_type=pystac.MediaType.COG))
        for b in ("B04", "B03", "B02"):
            item.add_asset(b, pystac.Asset(f"./items/{iid}/{b}.tif",
                                           extra_fields={"eo:bands": [{"name": b}]}))
        items.append({"item": item, "rgb": rgb})
    return items


def stac_itemcollection(root: Path, n: int = 2, size: int = 200) -> tuple[Path, list[Any]]:
    import pystac

    its = stac_items(root, n, size)
    ic = pystac.ItemCollection([x["item"] for x in its])
    path = root / "items.geojson"
    path.write_text(json.dumps(ic.to_dict(transform_hrefs=False)))
    return path, its


def stac_catalog(root: Path, n: int = 2, size: int = 200) -> tuple[Path, list[Any]]:
    import pystac

    its = stac_items(root, n, size)
    cat = pystac.Catalog("test", "generated catalog")
    for x in its:
        item = x["item"]
        for a in item.assets.values():  # absolute, then relative to each item's own json
            a.href = str((root / a.href).resolve())
        cat.add_item(item)
    cat.normalize_hrefs(str(root))
    cat.make_all_asset_hrefs_relative()
    cat.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json", its
