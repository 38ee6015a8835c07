"""Searcher: exact scores vs brute force, λ extremes, query exclusion, filters, float16 top-10."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from rscir.encoders.base import ModelInfo, l2_normalize
from rscir.errors import ModelMismatchError
from rscir.search import ItemFilter, Searcher
from rscir.stores import DirectoryStore

INFO = ModelInfo(name="m", arch="A", fingerprint="sha256:aa", dim=16)


def build(tmp_path: Path, n: int = 300, dtype: str = "float32", seed: int = 0) -> tuple[DirectoryStore, np.ndarray]:
    x = l2_normalize(np.random.default_rng(seed).normal(size=(n, 16)))
    st = DirectoryStore.create(tmp_path / f"s-{dtype}", INFO, tmp_path, dtype=dtype)
    labels = ["pool" if i % 3 == 0 else "road" for i in range(n)]
    lon = np.linspace(0, 10, n)
    st.add(x, [{"path": f"{labels[i]}/{i}.jpg", "label": labels[i], "lon": lon[i], "lat": 1.0}
               for i in range(n)])
    return st, x


def test_weicom_scores_equal_brute_force(tmp_path: Path) -> None:
    st, x = build(tmp_path, chunk := 300)
    s = Searcher(st, None, chunk_rows=64)  # chunking must not change anything
    rng = np.random.default_rng(5)
    qi, qt = l2_normalize(rng.normal(size=(3, 16))), l2_normalize(rng.normal(size=(3, 16)))
    rows, vals = s.search_vectors(qi, qt, "weicom", 0.3, k=chunk)
    for q in range(3):
        a, b = x @ qi[q], x @ qt[q]
        ref = 0.3 * norm.cdf((b - b.mean()) / b.std(ddof=1)) + 0.7 * norm.cdf((a - a.mean()) / a.std(ddof=1))
        np.testing.assert_allclose(vals[q], ref[rows[q]], atol=1e-5)
        assert np.array_equal(rows[q][:10], np.argsort(-ref)[:10])


@pytest.mark.parametrize("method", ["image", "text", "average", "sum", "product"])
def test_other_methods_equal_brute_force(tmp_path: Path, method: str) -> None:
    st, x = build(tmp_path)
    rng = np.random.default_rng(6)
    qi, qt = l2_normalize(rng.normal(size=(2, 16))), l2_normalize(rng.normal(size=(2, 16)))
    rows, vals = Searcher(st, None).search_vectors(qi, qt, method, 0.5, k=7)
    a, b = qi @ x.T, qt @ x.T
    ref = {"image": a, "text": b, "average": (a + b) / 2, "sum": a + b, "product": a * b}[method]
    assert np.array_equal(rows, np.argsort(-ref, axis=1)[:, :7])
    np.testing.assert_allclose(vals, np.take_along_axis(ref, rows, 1), atol=1e-5)


def test_lambda_extremes_equal_unimodal(tmp_path: Path) -> None:
    st, _ = build(tmp_path)
    s = Searcher(st, None)
    rng = np.random.default_rng(7)
    qi, qt = l2_normalize(rng.normal(size=(4, 16))), l2_normalize(rng.normal(size=(4, 16)))
    assert np.array_equal(s.search_vectors(qi, qt, "weicom", 0.0, 50)[0],
                          s.search_vectors(qi, None, "image", 0.0, 50)[0])
    assert np.array_equal(s.search_vectors(qi, qt, "weicom", 1.0, 50)[0],
                          s.search_vectors(None, qt, "text", 0.0, 50)[0])


def test_exclusion_and_filters(tmp_path: Path) -> None:
    st, x = build(tmp_path)
    s = Searcher(st, None)
    rows, _ = s.search_vectors(x[:1], None, "image", k=5)
    assert rows[0, 0] == 0  # the item itself is its own best match ...
    rows, _ = s.search_vectors(x[:1], None, "image", k=5, exclude_ids=[0])
    assert 0 not in rows[0]  # ... unless excluded
    f = ItemFilter(labels=("pool",), bbox=(0.0, 0.0, 5.0, 2.0))
    rows, _ = s.search_vectors(x[:1], None, "image", k=20, where=f)
    assert rows.shape == (1, 20)
    sel = st.items.iloc[rows[0]]
    assert (sel["label"] == "pool").all() and (sel["lon"] <= 5).all()
    # only 50 pool items lie in the box: asking for more returns exactly those
    rows, _ = s.search_vectors(x[:1], None, "image", k=1000, where=f)
    assert rows.shape[1] == int(f.mask(st.items).sum()) == 50


def test_float16_top10_changes_only_within_ties(tmp_path: Path) -> None:
    st16, x = build(tmp_path, n=2000, dtype="float16", seed=11)
    st32, _ = build(tmp_path, n=2000, dtype="float32", seed=11)
    rng = np.random.default_rng(12)
    qi, qt = l2_normalize(rng.normal(size=(8, 16))), l2_normalize(rng.normal(size=(8, 16)))
    r16, _ = Searcher(st16, None).search_vectors(qi, qt, "weicom", 0.5, 10)
    r32, v32 = Searcher(st32, None).search_vectors(qi, qt, "weicom", 0.5, 40)
    full = Searcher(st32, None).scores(qi, qt, "weicom", 0.5)
    for q in range(8):
        if np.array_equal(r16[q], r32[q, :10]):
            continue
        # any difference must be between items whose exact scores are within float16 resolution
        diff = set(r16[q]) ^ set(r32[q, :10])
        tenth = v32[q, 9]
        assert all(abs(full[q, r] - tenth) < 2e-3 for r in diff)


def test_searcher_checks_model(tmp_path: Path, tiny_encoder) -> None:
    st, _ = build(tmp_path)
    with pytest.raises(ModelMismatchError):
        Searcher(st, tiny_encoder)


def test_search_end_to_end(tmp_path: Path, image_folder: Path, tiny_encoder) -> None:
    from PIL import Image

    from rscir.ingest import index_folder

    index_folder(image_folder, tmp_path / "s", tiny_encoder, num_workers=0, progress=False,
                 dtype="float32")
    st = DirectoryStore.open(tmp_path / "s")
    s = Searcher(st, tiny_encoder)
    q = image_folder / "beach" / "beach01.jpg"
    res = s.search(image=q, text=["with boats", "a harbor"], lam=0.5, k=5)
    assert len(res.hits) == 5 and res.query_id is not None
    assert "beach/beach01.jpg" not in [h.path for h in res.hits]
    assert [h.rank for h in res.hits] == [1, 2, 3, 4, 5]
    frame = res.to_frame()
    assert frame.shape == (5, 17) and list(frame.columns[:5]) == ["rank", "id", "path", "score", "label"]
    by_id = s.search(item_id=res.query_id, k=5, exclude_query=False, method="image")
    # a random tiny model maps similar images close together: the query is among the exact ties
    top = [h.path for h in by_id.hits if h.score >= by_id.hits[0].score - 1e-6]
    assert by_id.hits[0].score == pytest.approx(1.0, abs=1e-5) and "beach/beach01.jpg" in top
    arr = np.asarray(Image.open(q).convert("RGB"))
    by_arr = s.search(image=arr, text="with boats", k=5, exclude_query=False, method="image")
    top = [h.path for h in by_arr.hits if h.score >= by_arr.hits[0].score - 1e-6]
    assert "beach/beach01.jpg" in top
    with pytest.raises(ValueError, match="needs a text"):
        s.search(image=q, method="weicom")
    with pytest.raises(FileNotFoundError):
        s.search(image=tmp_path / "nope.jpg", text="x")
