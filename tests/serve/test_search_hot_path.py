"""The search hot path the server runs: hits built from per-generation column arrays equal the
item metadata row by row, the float32 scan copy changes no result, and the HTTP response carries
exactly the in-process hits (footprints, times, CRS, missing values included)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import box, mapping

from rscir.encoders.base import l2_normalize
from rscir.search import ItemFilter, Searcher
from rscir.search.results import META_COLUMNS
from rscir.stores import DirectoryStore
from rscir.stores.base import EmbeddingStore

N = 400
TEXTS = ["a harbor with boats", "dense forest"]


def items(n: int, seed: int = 0, prefix: str = "t") -> pd.DataFrame:
    """Metadata with every kind of value a hit carries, and every kind of missing value."""
    rng = np.random.default_rng(seed)
    lon, lat = rng.uniform(-20, 20, n), rng.uniform(30, 60, n)
    return pd.DataFrame({
        "path": [f"{prefix}/{i:05d}.png" for i in range(n)],
        "label": [None if i % 5 == 0 else f"class{i % 7}" for i in range(n)],
        "labels": [[] if i % 3 == 0 else [f"class{i % 7}", "coast"] for i in range(n)],
        "lon": np.where(np.arange(n) % 11 == 0, np.nan, lon),
        "lat": np.where(np.arange(n) % 11 == 0, np.nan, lat),
        "width": [-1 if i % 4 == 0 else 64 + i for i in range(n)],
        "height": [-1 if i % 4 == 0 else 32 + i for i in range(n)],
        "datetime": [None if i % 2 else f"2021-03-{1 + i % 28:02d}T10:{i % 60:02d}:07.25Z"
                     for i in range(n)],
        "crs": [None if i % 3 else "EPSG:32633" for i in range(n)],
        "footprint": [box(x - 0.1, y - 0.1, x + 0.1, y + 0.1).wkt if i % 2 == 0 else None
                      for i, (x, y) in enumerate(zip(lon, lat, strict=True))],
    })


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory, tiny_encoder) -> Path:
    base = tmp_path_factory.mktemp("hot")
    rng = np.random.default_rng(3)
    emb = l2_normalize(rng.standard_normal((N, tiny_encoder.info.dim))).astype(np.float32)
    st = DirectoryStore.create(base / "store", tiny_encoder.info, base, dtype="float16")
    st.add(emb, items(N))
    st.close()
    return base / "store"


def expected_meta(store: DirectoryStore, item_id: int) -> dict:
    """An item's hit fields, read row-wise from the store's DataFrame (the reference)."""
    r = store.items_for_ids([item_id]).iloc[0]

    def num(v: float) -> float | None:
        return None if math.isnan(v) else float(v)

    return {
        "id": int(r["id"]), "path": r["path"],
        "label": None if pd.isna(r["label"]) else r["label"],
        "labels": list(r["labels"]), "lon": num(r["lon"]), "lat": num(r["lat"]),
        "datetime": None if pd.isna(r["datetime"]) else r["datetime"].isoformat(),
        "crs": r["crs"], "width": None if r["width"] < 0 else int(r["width"]),
        "height": None if r["height"] < 0 else int(r["height"]),
        "footprint": None if r["footprint"] is None
        else mapping(shapely.from_wkb(r["footprint"])),
    }


def same(a: object, b: object) -> bool:
    """Equality where a missing value equals the same kind of missing value (NaN, NaT)."""
    if a is not None and not isinstance(a, list | bytes) and pd.isna(a):
        return type(a) is type(b) and pd.isna(b)
    return bool(a == b)


def test_columns_for_ids_equal_items_for_ids(store_dir: Path) -> None:
    st = DirectoryStore.open(store_dir)
    ids = st.ids[[7, 0, 399, 7, 128, 55]]
    fast = st.columns_for_ids(ids, META_COLUMNS)
    df = st.items_for_ids(ids)
    for name in META_COLUMNS:
        ref = df[name].tolist()
        assert len(fast[name]) == len(ref)
        assert all(same(a, b) for a, b in zip(fast[name], ref, strict=True)), name
    # the base class's default (any backend) gives the same lists
    base = EmbeddingStore.columns_for_ids(st, ids, META_COLUMNS)
    assert all(same(a, b) for n in META_COLUMNS for a, b in zip(base[n], fast[n], strict=True))
    with pytest.raises(Exception, match="unknown item id"):
        st.columns_for_ids([10**9], META_COLUMNS)


def test_hits_carry_each_items_metadata(store_dir: Path, tiny_encoder) -> None:
    st = DirectoryStore.open(store_dir)
    s = Searcher(st, tiny_encoder)
    seen = {"footprint": 0, "no_footprint": 0, "no_label": 0, "datetime": 0, "no_width": 0}
    for q in range(0, N, 37):
        res = s.search(item_id=q, text=TEXTS[q % 2], lam=0.4, k=25)
        assert [h.rank for h in res.hits] == list(range(1, 26))
        for h in res.hits:
            d = asdict(h)
            assert {k: d[k] for k in expected_meta(st, h.id)} == expected_meta(st, h.id)
            assert -1.0 <= h.sim_image <= 1.0 and -1.0 <= h.sim_text <= 1.0
            assert 0.0 <= h.norm_image <= 1.0 and 0.0 <= h.norm_text <= 1.0
            seen["footprint"] += h.footprint is not None
            seen["no_footprint"] += h.footprint is None
            seen["no_label"] += h.label is None
            seen["datetime"] += h.datetime is not None
            seen["no_width"] += h.width is None
    assert all(v > 0 for v in seen.values()), seen  # every case was exercised
    fp = next(h.footprint for h in res.hits if h.footprint is not None)
    assert fp["type"] == "Polygon" and len(fp["coordinates"][0]) == 5


def test_scan_copy_changes_no_result(store_dir: Path, tiny_encoder) -> None:
    """Searching the float32 copy of a float16 store equals searching the memmap bit for bit
    (float16 -> float32 is exact), on the full scan and on filtered subsets."""
    fast = DirectoryStore.open(store_dir)
    slow = DirectoryStore.open(store_dir)
    slow.SCAN_CACHE_BYTES = 0  # type: ignore[misc]  # this instance streams the memmap
    assert slow.scan_embeddings is slow.embeddings and slow.embeddings.dtype == np.float16
    x = fast.scan_embeddings
    assert x.dtype == np.float32 and not x.flags.writeable
    assert np.array_equal(x, fast.embeddings.astype(np.float32))
    assert fast.scan_embeddings is x  # made once per generation
    a, b = Searcher(fast, tiny_encoder, strategy="brute"), Searcher(slow, tiny_encoder,
                                                                     strategy="brute")
    where = ItemFilter(labels=("class3", "class5"))
    for q in range(0, N, 53):
        for kw in ({}, {"where": where}):
            ra = a.search(item_id=q, text=TEXTS[q % 2], lam=[0.0, 0.3, 1.0], k=15, **kw)
            rb = b.search(item_id=q, text=TEXTS[q % 2], lam=[0.0, 0.3, 1.0], k=15, **kw)
            assert [[asdict(h) for h in r.hits] for r in ra] == \
                [[asdict(h) for h in r.hits] for r in rb]
    assert np.array_equal(fast.vectors_for_ids([5, 9]), slow.vectors_for_ids([5, 9]))


def test_scan_copy_follows_the_store_generation(tmp_path: Path, tiny_encoder) -> None:
    rng = np.random.default_rng(5)
    dim = tiny_encoder.info.dim
    st = DirectoryStore.create(tmp_path / "s", tiny_encoder.info, tmp_path, dtype="float16")
    st.add(l2_normalize(rng.standard_normal((50, dim))).astype(np.float32), items(50))
    s = Searcher(st, None, strategy="brute")
    old = st.scan_embeddings
    assert old.shape == (50, dim)
    new = l2_normalize(rng.standard_normal((1, dim))).astype(np.float32)
    (nid,) = st.add(new, items(1, prefix="new"))
    assert st.scan_embeddings.shape == (51, dim) and st.scan_embeddings is not old
    ids, _ = s.search_vectors(new, None, "image", k=1)
    assert ids.tolist() == [[nid]]  # the new item is found: no stale copy is scanned
    assert s.search(item_id=int(nid), method="image", k=1, exclude_query=False).hits[0].path \
        == "new/00000.png"
    st.close()


def test_http_hits_equal_in_process_hits(store_dir: Path, tiny_encoder) -> None:
    pytest.importorskip("fastapi")
    import orjson
    from fastapi.testclient import TestClient

    from rscir.serve import create_app

    s = Searcher(DirectoryStore.open(store_dir), tiny_encoder)
    with TestClient(create_app(s)) as c:
        for q in (0, 21, 222):
            body = {"item_id": q, "texts": [TEXTS[q % 2]], "lams": [0.2, 0.7], "k": 12,
                    "offset": 3}
            r = c.post("/search", json=body)
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            got = r.json()
            ref = s.search(item_id=q, text=[TEXTS[q % 2]], lam=[0.2, 0.7], k=12, offset=3)
            for lr, res in zip(got["results"], ref, strict=True):
                assert (lr["lam"], lr["method"], lr["offset"]) == (res.lam, "weicom", 3)
                want = [{**asdict(h), "thumbnail": f"/items/{h.id}/thumbnail"}
                        for h in res.hits]
                # the JSON of the in-process hits (tuples become lists), in field order
                assert lr["hits"] == orjson.loads(orjson.dumps(want))
                assert [list(h) for h in lr["hits"]] == [list(h) for h in want]
            nolabel = c.get(f"/items/{int(s.store.ids[0])}").json()
            assert nolabel["label"] is None  # a missing label is null, not "nan"


def test_serve_gives_each_search_thread_its_share_of_blas_threads() -> None:
    """`rscir serve --workers W` runs W searches at once: each gets cores // W BLAS threads."""
    import os

    from threadpoolctl import threadpool_info

    from rscir.cli.serve import limit_blas_threads

    cores = len(os.sched_getaffinity(0))
    for workers, want in ((10_000, 1), (1, cores), (2, max(1, cores // 2))):
        limiter = limit_blas_threads(workers)
        try:
            blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
            assert blas and all(i["num_threads"] == want for i in blas), (workers, blas)
        finally:
            limiter.restore_original_limits()
