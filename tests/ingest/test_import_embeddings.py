"""`rscir import`: a GeoParquet embedding collection (Major TOM schema, other schemas by column
mapping) imported in chunks; the imported store answers queries exactly as a store indexed from
the same images, resumes, checks the dimension, works on Postgres, and its thumbnails are 404."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_image_folder
from PIL import Image

from rscir.api import open_searcher
from rscir.cli import main
from rscir.errors import ModelMismatchError, PathNotFoundError
from rscir.ingest import index_folder
from rscir.ingest.collections import ColumnMap, import_embeddings
from rscir.ingest.render import item_image
from rscir.stores import DirectoryStore

gpd = pytest.importorskip("geopandas")
shapely = pytest.importorskip("shapely")


def major_tom_file(path: Path, folder: Path, rels: list[str], emb: np.ndarray) -> pd.DataFrame:
    """The Major TOM embedding schema for these images: vectors as (1, d) arrays scaled away
    from unit length, WGS84 polygons (GeoParquet), compact timestamps, UTM footprints."""
    from pyproj import Transformer

    to_wgs = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    rows = []
    for i, rel in enumerate(rels):
        x0, y0 = 500_000 + 480 * i, 5_000_000
        utm = shapely.box(x0, y0 - 480, x0 + 480, y0)
        lon, lat = to_wgs.transform(*np.asarray(utm.exterior.coords).T)
        rows.append({
            "unique_id": f"u{i}", "grid_cell": f"{i}U_{i % 3}R", "grid_row_u": i,
            "grid_col_r": i % 3, "product_id": Path(rel).stem,
            "timestamp": f"2020091{i % 10}T065631",
            "embedding": [list(map(float, emb[i] * (1 + i % 4)))],
            "centre_lat": float(np.mean(lat[:4])), "centre_lon": float(np.mean(lon[:4])),
            "utm_footprint": utm.wkt, "utm_crs": "EPSG:32633", "pixel_bbox": [[0, 0, 48, 48]],
            "geometry": shapely.Polygon(np.c_[lon, lat]),
        })
    gdf = gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326")
    gdf.to_parquet(path)
    return gdf


@pytest.fixture()
def archive(tmp_path: Path, tiny_encoder) -> tuple[Path, list[str], Path]:
    folder = make_image_folder(tmp_path / "a", {"beach": 6, "forest": 5, "harbor": 5})
    rels = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.*"))
    emb = tiny_encoder.encode_images([Image.open(folder / r) for r in rels])
    f = tmp_path / "mt" / "embeddings.parquet"
    f.parent.mkdir()
    major_tom_file(f, folder, rels, emb)
    return folder, rels, f


def test_import_major_tom_same_topk_as_indexing(tmp_path: Path, archive, tiny_encoder,
                                                capsys) -> None:
    folder, rels, f = archive
    index_folder(folder, tmp_path / "indexed", tiny_encoder, num_workers=0, progress=False,
                 dtype="float32")
    rc = main(["import", str(f), "--store", str(tmp_path / "imp"), "--model", "rscir-tiny",
               "--device", "cpu", "--chunk-rows", "5", "--dtype", "float32", "--json",
               "--no-progress"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["rows"], rep["imported"], rep["skipped"], rep["normalized"]) == (16, 16, 0, True)
    st = DirectoryStore.open(tmp_path / "imp")
    assert st.manifest.model.same_space(tiny_encoder.info)
    items = st.items.set_index("path")
    gdf = gpd.read_parquet(f)
    for i, rel in enumerate(rels):
        row = items.loc[f"{i}U_{i % 3}R/{Path(rel).stem}#window=0,0,48,48"]
        assert row["datetime"] == pd.Timestamp(f"2020-09-1{i % 10}T06:56:31Z")
        assert row["crs"] == "EPSG:32633"
        assert shapely.from_wkb(row["footprint"]).equals_exact(gdf.geometry.iloc[i], 1e-9)
        assert shapely.from_wkb(row["footprint_native"]).bounds[0] == 500_000 + 480 * i
        assert row["lon"] == pytest.approx(gdf["centre_lon"].iloc[i])
    # same queries, same top-k (item ↔ item through the product id)
    back = {p: rels[i] for i, p in enumerate(
        f"{i}U_{i % 3}R/{Path(r).stem}#window=0,0,48,48" for i, r in enumerate(rels))}
    a = open_searcher(tmp_path / "indexed", device="cpu")
    b = open_searcher(tmp_path / "imp", device="cpu")
    for q, text, lam in ((rels[0], "a sandy beach", 0.5), (rels[7], "boats", 0.0),
                         (rels[12], "dense forest", 1.0)):
        ra = a.search(image=folder / q, text=text, lam=lam, k=8, exclude_query=False)
        rb = b.search(image=folder / q, text=text, lam=lam, k=8, exclude_query=False)
        assert [h.path for h in ra.hits] == [back[h.path] for h in rb.hits]
        np.testing.assert_allclose([h.score for h in ra.hits], [h.score for h in rb.hits],
                                   atol=1e-4)
    # the moments are those of the stored vectors, as for any index
    np.testing.assert_allclose(st.moments().sum, np.asarray(st.embeddings, np.float64).sum(0),
                               atol=1e-5)
    # no image: the thumbnail fails cleanly
    with pytest.raises(PathNotFoundError):
        item_image(st, items.index[0])
    # resuming imports nothing twice
    rep2 = import_embeddings(f, tmp_path / "imp", tiny_encoder.info, chunk_rows=7,
                             progress=False, dtype="float32")
    assert (rep2.imported, rep2.already) == (0, 16) and len(DirectoryStore.open(
        tmp_path / "imp")) == 16


def test_thumbnail_404(tmp_path: Path, archive, tiny_encoder) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from rscir.serve.app import create_app

    _, _, f = archive
    import_embeddings(f, tmp_path / "imp", tiny_encoder.info, progress=False)
    with TestClient(create_app(tmp_path / "imp", device="cpu")) as c:
        r = c.get("/items/0/thumbnail")
        assert r.status_code == 404 and "missing" in r.json()["detail"]
        assert c.get("/items/0").json()["lon"] is not None


def test_column_mapping_dimension_and_bad_rows(tmp_path: Path, tiny_encoder) -> None:
    d = tiny_encoder.dim
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(5, d)).astype(np.float32)
    df = pd.DataFrame({"source_url": [f"s3://b/tile_{i}.tif" for i in range(5)],
                       "date": pd.to_datetime(["2021-01-01"] * 5),
                       "embeddings": [list(v) for v in vec]})
    df.loc[3, "embeddings"] = None
    df.at[4, "embeddings"] = [float("nan")] * d
    gdf = gpd.GeoDataFrame(df, geometry=gpd.points_from_xy(range(5), range(5)), crs="EPSG:4326")
    f = tmp_path / "clay.parquet"
    gdf.to_parquet(f)
    cm = ColumnMap.parse("embedding=embeddings,datetime=date,path={source_url}#{date},window=")
    rep = import_embeddings(f, tmp_path / "s", tiny_encoder.info, columns=cm, progress=False,
                            dtype="float32")
    assert (rep.imported, rep.skipped) == (3, 2)
    st = DirectoryStore.open(tmp_path / "s")
    assert st.items["path"].iloc[0].startswith("s3://b/tile_0.tif#2021-01-01")
    np.testing.assert_allclose(np.asarray(st.embeddings[0]),
                               vec[0] / np.linalg.norm(vec[0]), atol=1e-6)
    assert st.items["lon"].tolist() == [0.0, 1.0, 2.0]
    bad = pd.DataFrame({"embeddings": [[0.1] * (d + 3)] * 2, "source_url": ["a", "b"]})
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ModelMismatchError, match="dim"):
        import_embeddings(tmp_path / "bad.parquet", tmp_path / "s2", tiny_encoder.info,
                          columns=ColumnMap.parse("embedding=embeddings,path=source_url"),
                          progress=False)


def test_import_into_postgres(tmp_path: Path, pg_uri: str, archive, tiny_encoder) -> None:
    from conftest import with_schema

    from rscir.stores import open_store

    _, rels, f = archive
    uri = with_schema(pg_uri, "imported")
    rep = import_embeddings(f, uri, tiny_encoder.info, chunk_rows=6, progress=False)
    assert rep.imported == len(rels)
    with open_store(uri) as st:
        assert len(st) == len(rels) and st.items["footprint"].notna().all()
        assert st.items["datetime"].notna().all()
