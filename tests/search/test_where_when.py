"""Where and when: filters, paging, export and "why it matched", on both stores.

Every filter must give exactly the hits of the unfiltered exact ranking with the failing items
removed, with unchanged scores (normalization stays over the whole archive), for every strategy
of every backend; exported files must round-trip through geopandas with the store's footprints.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from scipy.stats import norm
from shapely.geometry import box, mapping

from rscir.cli import main
from rscir.encoders.base import ModelInfo, l2_normalize
from rscir.errors import QueryError
from rscir.moments import ArchiveMoments
from rscir.search import ItemFilter, Searcher, SearchParams, strategies_for
from rscir.search.ann import build_index
from rscir.search.export import to_geojson
from rscir.search.results import score_decimals
from rscir.search.searcher import resolve_method
from rscir.stores import EmbeddingStore, open_or_create_store

DIM = 16
N = 240
INFO = ModelInfo(name="m", arch="A", fingerprint="sha256:aa", dim=DIM)
BACKENDS = ["embedded", "postgres"]


def archive(n: int = N, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Clustered vectors; footprints are small squares (rotated for odd items), some items have
    only a centre point, some no place at all; dates over two years."""
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(5, DIM))
    lab = rng.integers(0, 5, n)
    x = l2_normalize(cent[lab] + 0.8 * rng.normal(size=(n, DIM))).astype(np.float32)
    items = []
    for i in range(n):
        lon, lat = float(rng.uniform(-10, 10)), float(rng.uniform(40, 50))
        it: dict = {"path": f"c{lab[i]}/{i:04d}.tif", "label": f"c{lab[i]}",
                    "labels": [f"c{lab[i]}", "even" if i % 2 == 0 else "odd"] +
                    (["water"] if i % 7 == 0 else []),
                    "datetime": pd.Timestamp("2023-01-01", tz="UTC") + pd.Timedelta(days=3 * i)}
        if i % 10 == 9:
            pass  # no place known
        elif i % 10 == 8:
            it.update(lon=lon, lat=lat)  # a centre point only
        else:
            sq = box(lon - 0.3, lat - 0.2, lon + 0.3, lat + 0.2)
            if i % 2:
                sq = shapely.affinity.rotate(sq, 30)
            it.update(lon=lon, lat=lat, footprint=sq, crs="EPSG:4326")
        items.append(it)
    # one item across the antimeridian's east side, one on its west side
    items[0].update(lon=179.9, lat=0.0, footprint=box(179.8, -0.1, 180.0, 0.1))
    items[2].update(lon=-179.9, lat=0.0, footprint=box(-180.0, -0.1, -179.8, 0.1))
    return x, items


@pytest.fixture()
def store(store_location: Callable[[], str], tmp_path: Path):
    x, items = archive()
    st = open_or_create_store(store_location(), INFO, tmp_path, dtype="float32")
    for s in np.array_split(np.arange(N), 2):
        st.add(x[s], [items[i] for i in s])
    st.compact()
    if st.backend == "embedded":
        build_index(st, "flat")  # type: ignore[arg-type]
    yield st
    st.close()


FILTERS = {
    "label any": ItemFilter(labels=("c1", "water")),
    "label all": ItemFilter(labels=("c2", "even"), all_labels=True),
    "bbox": ItemFilter(bbox=(-5, 42, 3, 47)),
    "antimeridian bbox": ItemFilter(bbox=(179.5, -1, -179.5, 1)),
    "within polygon": ItemFilter(within=mapping(shapely.Polygon(
        [(-8, 41), (6, 43), (2, 49), (-9, 48), (-8, 41)]))),
    "dates": ItemFilter(start="2023-03-01", end="2023-12-31"),
    "ids": ItemFilter(ids=tuple(range(0, N, 3))),
    "exclude ids": ItemFilter(exclude_ids=tuple(range(0, N, 2))),
    "combined": ItemFilter(labels=("even",), bbox=(-10, 40, 10, 50), start="2023-06-01"),
}


def expected_mask(st: EmbeddingStore, f: ItemFilter, items: list[dict]) -> np.ndarray:
    """The filter evaluated by hand from the generating data (ids are positions)."""
    area = f.area()
    keep = np.ones(N, bool)
    for i, it in enumerate(items):
        labs = {it["label"], *it["labels"]}
        if f.labels:
            keep[i] &= (set(f.labels) <= labs) if f.all_labels else bool(set(f.labels) & labs)
        if f.ids is not None:
            keep[i] &= i in f.ids
        keep[i] &= i not in f.exclude_ids
        t = it["datetime"]
        if f.start is not None:
            keep[i] &= t >= f.start
        if f.end is not None:
            keep[i] &= t <= f.end
        if area is not None:
            g = it.get("footprint") or (shapely.Point(it["lon"], it["lat"]) if "lon" in it
                                        else None)
            keep[i] &= g is not None and area.intersects(g)
    return keep


@pytest.mark.parametrize("store_location", BACKENDS, indirect=True)
def test_each_filter_equals_filtering_the_exact_ranking(store: EmbeddingStore) -> None:
    _, items = archive()
    x = np.asarray(store.vectors_for_ids(list(range(N))), np.float64)
    qi, qt = x[11].astype(np.float32), l2_normalize(x[40] + x[90]).astype(np.float32)
    exact = Searcher(store, None, strategy="brute")
    full = exact.search_ids(qi, qt, "weicom", [0.4], N, exclude_id=11)[0]
    by_id = dict(zip(full.ids.tolist(), full.scores.tolist(), strict=True))
    for name, f in FILTERS.items():
        want_mask = expected_mask(store, f, items)
        np.testing.assert_array_equal(f.mask(store.filter_index())[np.argsort(store.ids)],
                                      want_mask, err_msg=name)
        want = [i for i in full.ids.tolist() if want_mask[i]][:15]
        assert want, name
        for strat in sorted(strategies_for(store.backend)):
            s = Searcher(store, None, strategy=strat, params=SearchParams(ef_search=1000))
            got = s.search_ids(qi, qt, "weicom", [0.4], 15, exclude_id=11, where=f)[0]
            assert got.ids.tolist() == want, (name, strat)
            np.testing.assert_allclose(got.scores, [by_id[i] for i in want], atol=1e-6)


@pytest.mark.parametrize("store_location", BACKENDS, indirect=True)
def test_paging_concatenated_equals_one_large_query(store: EmbeddingStore) -> None:
    s = Searcher(store, None)
    x = store.vectors_for_ids([5, 6])
    one = s.search_ids(x[0], x[1], "weicom", [0.5], 100, exclude_id=5)[0]
    pages = []
    for off in range(0, 100, 30):
        r = s.search_ids(x[0], x[1], "weicom", [0.5], off + 30, exclude_id=5)[0]
        pages += r.ids[off:off + 30].tolist()
    assert pages[:100] == one.ids.tolist()


# ------------------------------------------------------------------------------ the Python API
class _Enc:
    """A stand-in text/image encoder for the store's space."""

    def __init__(self, store: EmbeddingStore) -> None:
        self.info = INFO
        self.dim = DIM
        self.x = store.vectors_for_ids([0, 1, 2])

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.x[len(t) % 3] for t in texts])

    def encode_images(self, images: list) -> np.ndarray:
        return np.stack([self.x[0] for _ in images])


@pytest.mark.parametrize("store_location", ["embedded"], indirect=True)
def test_queries_say_what_they_mean(store: EmbeddingStore) -> None:
    s = Searcher(store, _Enc(store))  # type: ignore[arg-type]
    assert s.search(item_id=3, k=5).method == "image"
    assert s.search(text="water", k=5).method == "text"
    assert s.search(item_id=3, text="water", k=5).method == "weicom"
    r0 = s.search(item_id=3, method="weicom", lam=0.0, k=5)  # λ = 0: no text needed
    assert r0.method == "image"
    res = s.search(item_id=3, text="water", lam=[0.0, 0.5, 1.0], k=5)
    assert isinstance(res, list) and [r.lam for r in res] == [0.0, 0.5, 1.0]
    with pytest.raises(QueryError, match="text="):
        s.search(item_id=3, method="sum", k=5)
    with pytest.raises(QueryError, match="image= or item_id="):
        s.search(text="water", method="average", k=5)
    with pytest.raises(QueryError, match="give a query"):
        s.search(k=5)
    with pytest.raises(ValueError, match="lambda"):
        s.search(item_id=3, text="x", lam=[0.2, 1.5])
    assert resolve_method(None, True, True) == "weicom"


@pytest.mark.parametrize("store_location", BACKENDS, indirect=True)
def test_hits_say_why_they_matched(store: EmbeddingStore) -> None:
    s = Searcher(store, _Enc(store))  # type: ignore[arg-type]
    x = np.asarray(store.vectors_for_ids(list(range(N))), np.float64)
    r = s.search(item_id=7, text="ab", lam=0.3, k=8)
    qi, qt = x[7], x[2]
    am = ArchiveMoments.of(x)
    zi = (x @ qi - am.mean @ qi) / np.sqrt(qi @ am.cov @ qi)
    zt = (x @ qt - am.mean @ qt) / np.sqrt(qt @ am.cov @ qt)
    for h in r.hits:
        assert h.sim_image == pytest.approx(min(1.0, x[h.id] @ qi), abs=1e-6)
        assert h.sim_text == pytest.approx(min(1.0, x[h.id] @ qt), abs=1e-6)
        assert h.norm_image == pytest.approx(norm.cdf(zi[h.id]), abs=1e-6)
        assert h.norm_text == pytest.approx(norm.cdf(zt[h.id]), abs=1e-6)
        assert h.score == pytest.approx(0.3 * h.norm_text + 0.7 * h.norm_image, abs=1e-6)
        assert -1.0 <= h.sim_image <= 1.0
    geo = [h for h in r.hits if h.footprint is not None]
    assert geo and all(h.datetime.startswith("2023") or h.datetime.startswith("2024")
                       for h in r.hits)
    same = s.search(item_id=7, method="image", k=1, exclude_query=False).hits[0]
    assert same.id == 7 and same.sim_image <= 1.0  # clamped, never 1.00004


def test_score_decimals_make_neighbours_distinct() -> None:
    assert score_decimals([0.99991, 0.99987, 0.99987, 0.5]) == 5
    assert score_decimals([0.9, 0.8]) == 4
    assert score_decimals([1.0 - 1e-9, 1.0 - 2e-9]) == 9


# ------------------------------------------------------------------------------ export
@pytest.mark.parametrize("store_location", BACKENDS, indirect=True)
def test_geojson_round_trips_through_geopandas(store: EmbeddingStore, tmp_path: Path) -> None:
    s = Searcher(store, _Enc(store))  # type: ignore[arg-type]
    res = s.search(item_id=4, text="abc", lam=[0.2, 0.7], k=20)
    gj = to_geojson(res, {"item_id": 4})
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 40
    f = tmp_path / "hits.geojson"
    f.write_text(json.dumps(gj))
    gdf = gpd.read_file(f)
    assert len(gdf) == 40 and gdf.crs.to_epsg() == 4326
    _, items = archive()
    for (_, row), feat in zip(gdf.iterrows(), gj["features"], strict=True):
        iid = int(row["id"])
        it = items[iid]
        if it.get("footprint") is not None:
            assert row.geometry.equals_exact(it["footprint"], 1e-9)
        elif "lon" in it:
            assert row.geometry.equals_exact(shapely.Point(it["lon"], it["lat"]), 1e-9)
        else:
            assert row.geometry is None and feat["geometry"] is None
        assert row["path"] == it["path"] and row["lam"] in (0.2, 0.7)


@pytest.mark.parametrize("fmt", ["geojson", "csv", "parquet", "json"])
def test_cli_exports_with_filters(tmp_path: Path, fmt: str, image_folder: Path, tiny_encoder,
                                  capsys) -> None:
    from rscir.ingest import index_folder

    st_dir = tmp_path / "st"
    index_folder(image_folder, st_dir, tiny_encoder, num_workers=0, progress=False)
    out = tmp_path / f"hits.{fmt}"
    rc = main(["search", str(st_dir), "--item-id", "1", "--text", "boats", "-k", "5",
               "--label", "beach", "--label", "harbor", "--format", fmt, "--out", str(out),
               "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    if fmt == "geojson":
        gdf = gpd.read_file(out)
        assert len(gdf) == 5 and set(gdf["label"]) <= {"beach", "harbor"}
    elif fmt == "csv":
        df = pd.read_csv(out)
        assert df["rank"].tolist() == [1, 2, 3, 4, 5] and "sim_image" in df
    elif fmt == "parquet":
        gdf = gpd.read_parquet(out)
        assert len(gdf) == 5 and gdf.crs.to_epsg() == 4326
    else:
        data = json.loads(out.read_text())
        assert data["query"]["filter"]["labels"] == ["beach", "harbor"]
    # the same query paged from the command line: offset 2 continues at rank 3
    rc = main(["search", str(st_dir), "--item-id", "1", "--text", "boats", "-k", "3",
               "--offset", "2", "--json", "--device", "cpu"])
    page = json.loads(capsys.readouterr().out)["results"][0]["hits"]
    assert rc == 0 and [h["rank"] for h in page] == [3, 4, 5]


def test_cli_filter_and_query_errors_name_flags(tmp_path: Path, image_folder: Path,
                                                tiny_encoder, capsys) -> None:
    from rscir.ingest import index_folder

    st_dir = tmp_path / "st"
    index_folder(image_folder, st_dir, tiny_encoder, num_workers=0, progress=False)
    for args, needle in ((["--item-id", "1", "--method", "sum"], "--text"),
                         (["--text", "x", "--method", "average"], "--image or --item-id"),
                         (["--item-id", "1", "--bbox", "1,2,3"], "W,S,E,N"),
                         (["--item-id", "1", "--start", "yesterday-ish"], "ISO date"),
                         (["--item-id", "1", "--format", "parquet"], "--out")):
        rc = main(["search", str(st_dir), *args, "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    rc = main(["search", str(st_dir), "--item-id", "1", "--lam", "0", "-k", "3", "--device",
               "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "method=image" in out  # --lam 0 without text: image only
