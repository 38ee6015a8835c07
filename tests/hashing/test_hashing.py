"""Hashing estimators, Hamming ranking and composed queries over codes (rscir.hashing)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from threadpoolctl import threadpool_limits

from rscir.bench.metrics import ranking_metrics
from rscir.hashing import (
    HASHERS,
    CodeMoments,
    HammingIndex,
    HashSearch,
    ITQHasher,
    KSHHasher,
    LSHHasher,
    MultiCodeHasher,
    canonical_topk,
    composed_hamming_scores,
    composed_hamming_search,
    hamming_distances,
    hamming_similarity,
    hamming_topk,
    make_hasher,
    multicode_distances,
    pack_bits,
    rerank,
    unpack_bits,
)
from rscir.scoring import QueryStats, topk

D = 32
N_CLASSES = 8


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Small arrays: BLAS/OpenMP threads only add waiting (minutes instead of seconds for KSH's
    eigen-solves on a busy 2-core machine)."""
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """400 vectors in 8 well-separated Gaussian clusters (labels in random order)."""
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((N_CLASSES, D)) * 1.5
    y = rng.integers(0, N_CLASSES, 400)
    x = centers[y] + rng.standard_normal((400, D))
    return x, y


FAST = {"deep": {"epochs": 30}}  # keyword arguments that keep the generic tests quick


def fast_hasher(name: str, n_bits: int, random_state: int):
    return make_hasher(name, n_bits, random_state=random_state, **FAST.get(name, {}))


def loo_map(codes: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out mAP of Hamming ranking (the query itself excluded)."""
    d = hamming_distances(codes, codes).astype(np.float64)
    np.fill_diagonal(d, np.inf)
    rel = y[:, None] == y[None, :]
    np.fill_diagonal(rel, False)
    return float(ranking_metrics(-d, rel, ks=(10,))["AP"].mean())


def popcount_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances from unpacked bits, the slow obvious way."""
    ua, ub = unpack_bits(a).astype(int), unpack_bits(b).astype(int)
    return (ua[:, None, :] != ub[None, :, :]).sum(axis=2)


# --- estimators ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HASHERS))
@pytest.mark.parametrize("n_bits", [8, 24, 32])
def test_codes_shape_dtype(clustered, name, n_bits):
    x, y = clustered
    h = fast_hasher(name, n_bits, 0).fit(x, y)
    codes = h.transform(x[:17])
    assert codes.shape == (17, n_bits // 8)
    assert codes.dtype == np.uint8
    assert h.decision_function(x[:17]).shape == (17, n_bits)
    # the bits are the signs of the projections
    np.testing.assert_array_equal(unpack_bits(codes), h.decision_function(x[:17]) > 0)


@pytest.mark.parametrize("name", sorted(HASHERS))
def test_deterministic_for_seed(clustered, name):
    x, y = clustered
    a = fast_hasher(name, 16, 3).fit(x, y).transform(x)
    b = fast_hasher(name, 16, 3).fit(x, y).transform(x)
    np.testing.assert_array_equal(a, b)
    c = fast_hasher(name, 16, 4).fit(x, y).transform(x)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", sorted(HASHERS))
def test_beats_random_codes(clustered, name):
    x, y = clustered
    n_bits = 32
    codes = fast_hasher(name, n_bits, 0).fit(x[:300], y[:300]).transform(x)
    rnd = pack_bits(np.random.default_rng(0).random((len(x), n_bits)) < 0.5)
    m, m_rnd = loo_map(codes, y), loo_map(rnd, y)
    assert m_rnd < 0.2  # ~ class prevalence
    assert m > m_rnd + 0.3, (m, m_rnd)


def test_ksh_supervision_helps(clustered):
    """On data whose classes are not the natural clusters, labels must make the difference."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8))
    y = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0)  # 4 quadrant classes, other dims noise
    x[:, 2:] *= 3.0  # noise dominates the variance
    ksh = KSHHasher(16, random_state=0).fit(x[:200], y[:200]).transform(x)
    lsh = LSHHasher(16, random_state=0).fit(x[:200]).transform(x)
    assert loo_map(ksh, y) > loo_map(lsh, y) + 0.2


def test_ksh_multilabel_targets(clustered):
    x, y = clustered
    multi = np.zeros((len(y), N_CLASSES + 1), int)
    multi[np.arange(len(y)), y] = 1
    multi[:, N_CLASSES] = y % 2  # a second label shared across classes
    codes = KSHHasher(32, random_state=0).fit(x, multi).transform(x)
    rnd = pack_bits(np.random.default_rng(0).random((len(x), 32)) < 0.5)
    assert loo_map(codes, y) > loo_map(rnd, y) + 0.3


def test_sklearn_api(clustered):
    x, y = clustered
    h = ITQHasher(16, random_state=0)
    assert clone(h).get_params() == h.get_params()
    np.testing.assert_array_equal(h.fit_transform(x), clone(h).fit(x).transform(x))
    assert h.n_features_in_ == D and h.n_bytes == 2


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input(clustered):
    x, y = clustered
    with pytest.raises(ValueError, match="multiple of 8"):
        LSHHasher(12).fit(x)
    with pytest.raises(ValueError, match="multiple of 8"):
        LSHHasher(0).fit(x)
    with pytest.raises(NotFittedError):
        LSHHasher(16).transform(x)
    h = LSHHasher(16, random_state=0).fit(x)
    with pytest.raises(ValueError, match="features"):
        h.transform(x[:, :10])
    with pytest.raises(ValueError, match="2D array"):
        h.transform(x[0])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        LSHHasher(16).fit(bad)
    with pytest.raises(ValueError, match="supervised"):
        KSHHasher(16).fit(x)
    with pytest.raises(ValueError, match="n_bits <= "):
        ITQHasher(40).fit(x)
    with pytest.raises(ValueError, match="unknown hashing method"):
        make_hasher("spectral", 16)
    with pytest.raises(ValueError, match="3-D"):
        MultiCodeHasher(LSHHasher(16)).fit(x[None, None])
    with pytest.raises(ValueError, match="uint8"):
        hamming_distances(x[:2], x[:2])
    with pytest.raises(ValueError, match="bytes per code"):
        hamming_distances(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="unknown index kind"):
        HammingIndex(16, "ivf")
    with pytest.raises(ValueError, match="multiple of 8"):
        HammingIndex(20)
    with pytest.raises(ValueError, match="bytes per code"):
        HammingIndex(16).add(np.zeros((3, 4), np.uint8))


# --- Hamming distances and ranking --------------------------------------------------------------


def test_hamming_hand_computed():
    a = np.array([[0b11110000, 0b00000001]], np.uint8)
    b = np.array([[0, 0], [0b11110000, 0b00000001], [0b00001111, 0b10000000]], np.uint8)
    np.testing.assert_array_equal(hamming_distances(a, b), [[5, 0, 10]])


@pytest.mark.parametrize("n_bytes", [1, 2, 3, 4, 8, 16])
def test_hamming_equals_reference(n_bytes):
    rng = np.random.default_rng(n_bytes)
    a = rng.integers(0, 256, (7, n_bytes), dtype=np.uint8)
    b = rng.integers(0, 256, (50, n_bytes), dtype=np.uint8)
    np.testing.assert_array_equal(hamming_distances(a, b), popcount_reference(a, b))


def _check_tie_aware(dist, ids, ref_full, k):
    """The returned list is a valid top-k of the brute-force distances: right distances, sorted,
    the multiset of distances equals the reference, ties in canonical order."""
    for q in range(len(ids)):
        np.testing.assert_array_equal(dist[q], ref_full[q, ids[q]])
        np.testing.assert_array_equal(dist[q], np.sort(ref_full[q])[:k])
        assert len(set(ids[q].tolist())) == k
        same = dist[q][1:] == dist[q][:-1]
        assert np.all(ids[q][1:][same] > ids[q][:-1][same])


@pytest.mark.parametrize("n_bits", [8, 32, 64])
def test_flat_index_equals_brute_force(n_bits):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (500, n_bits // 8), dtype=np.uint8)
    q = rng.integers(0, 256, (20, n_bits // 8), dtype=np.uint8)
    k = 25
    dist, ids = HammingIndex(n_bits, "flat").add(codes).search(q, k)
    ref = popcount_reference(q, codes)
    _check_tie_aware(dist, ids, ref, k)  # with 8 bits nearly every distance is tied
    ref_d, ref_i = hamming_topk(q, codes, k)
    np.testing.assert_array_equal(dist, ref_d)
    np.testing.assert_array_equal(ids, ref_i)  # boundary ties too: lower rows first
    np.testing.assert_array_equal(ref_i, np.argsort(ref, axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize("kind", ["mih", "hnsw"])
def test_approximate_indexes_are_consistent(kind):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, (400, 4), dtype=np.uint8)
    idx = HammingIndex(32, kind).add(codes)
    dist, ids = idx.search(codes[:30], 5)
    ref = popcount_reference(codes[:30], codes)
    found = ids >= 0
    np.testing.assert_array_equal(dist[found], np.take_along_axis(ref, np.where(found, ids, 0), 1)[found])
    assert np.all(np.diff(np.where(found, dist, 10**9), axis=1) >= 0)
    np.testing.assert_array_equal(dist[:, 0], 0)  # each code finds itself (or an exact twin)


def test_rerank_equals_exact_topk_on_candidates():
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((300, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = rng.standard_normal((6, 16))
    cand = np.stack([rng.choice(300, 40, replace=False) for _ in range(6)])
    cand[0, -5:] = -1  # fewer candidates for one query
    rows, scores = rerank(emb, q, cand, 10)
    for i in range(6):
        c = cand[i][cand[i] >= 0]
        s = emb[c].astype(np.float64) @ q[i]
        order = np.argsort(-s)[:10]
        np.testing.assert_array_equal(rows[i], c[order])
        np.testing.assert_allclose(scores[i], s[order], rtol=1e-12)


def test_hash_then_rerank_pipeline(clustered):
    """Hamming candidates re-ranked with float vectors: the exact top-k whenever the exact
    neighbours are among the candidates (here: candidates = whole archive)."""
    x, _ = clustered
    h = ITQHasher(16, random_state=0).fit(x)
    codes = h.transform(x)
    _, cand = HammingIndex(16).add(codes).search(h.transform(x[:5]), len(x))
    rows, _ = rerank(x, x[:5], cand, 8)
    exact, _ = topk(x[:5] @ x.T, 8)
    np.testing.assert_array_equal(rows, exact)


def test_hash_search_object(clustered):
    x, _ = clustered
    h = ITQHasher(16, random_state=0).fit(x)
    plain = HashSearch(h).add(x[:200]).add(x[200:])
    rows, scores = plain.search(x[:5], 10)
    ref_d, ref_i = hamming_topk(h.transform(x[:5]), h.transform(x), 10)
    np.testing.assert_array_equal(rows, ref_i)
    np.testing.assert_allclose(scores, 1 - ref_d / 16)
    exact = HashSearch(h, rerank_depth=len(x)).add(x[:200]).add(x[200:])
    rows, scores = exact.search(x[:5], 10)
    ref_rows, ref_scores = topk(x[:5] @ x.T, 10)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
    with pytest.raises(NotFittedError):
        HashSearch(ITQHasher(16))


@pytest.mark.parametrize("seed", range(5))
def test_canonical_topk_equals_stable_sort(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 4, (6, 300)).astype(np.float64)  # ties everywhere, at the k-th too
    s[0] = 1.0  # one constant row
    for k in (1, 7, 20, 300, 400):
        idx, vals = canonical_topk(s, k)
        ref = np.argsort(-s, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(idx, ref)
        np.testing.assert_array_equal(vals, np.take_along_axis(s, ref, 1))


# --- composed queries ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def composed_setup(clustered):
    x, _ = clustered
    rng = np.random.default_rng(5)
    h = LSHHasher(32, random_state=0).fit(x)
    codes = h.transform(x)
    img = h.transform(x[:8] + 0.3 * rng.standard_normal((8, D)))
    txt = h.transform(rng.standard_normal((8, D)))
    return codes, img, txt


def test_code_moments_equal_full_scan(composed_setup):
    codes, img, _ = composed_setup
    st = CodeMoments.of(codes, chunk=97).query_stats(img)
    ref = QueryStats.of(hamming_similarity(img, codes))
    np.testing.assert_allclose(st.mean, ref.mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(st.std, ref.std, rtol=0, atol=1e-12)


@pytest.mark.parametrize("lam,side", [(0.0, "img"), (1.0, "txt")])
def test_composed_extremes_equal_single_modality(composed_setup, lam, side):
    codes, img, txt = composed_setup
    rows, _ = composed_hamming_search(img, txt, codes, 30, lam=lam)
    _, ref_i = hamming_topk(img if side == "img" else txt, codes, 30)
    np.testing.assert_array_equal(rows, ref_i)


def test_composed_weicom_middle_and_candidates(composed_setup):
    codes, img, txt = composed_setup
    full = composed_hamming_scores(img, txt, codes, lam=0.4)
    si, st = hamming_similarity(img, codes), hamming_similarity(txt, codes)
    from scipy.special import ndtr

    def phi(s):
        return ndtr((s - s.mean(1, keepdims=True)) / s.std(1, ddof=1, keepdims=True))

    np.testing.assert_allclose(full, 0.4 * phi(st) + 0.6 * phi(si), atol=1e-12)
    # scoring only candidate rows with the archive's bit moments gives the same values
    rows = np.tile(np.arange(0, 400, 7), (len(img), 1))
    rows[0, 0] = -1
    part = composed_hamming_scores(
        img, txt, codes, lam=0.4, moments=CodeMoments.of(codes), rows=rows
    )
    ok = rows >= 0
    np.testing.assert_allclose(part[ok], np.take_along_axis(full, np.maximum(rows, 0), 1)[ok])
    assert part[0, 0] == -np.inf
    with pytest.raises(ValueError, match="CodeMoments"):
        composed_hamming_scores(img, txt, codes, rows=rows)


# --- multi-code ---------------------------------------------------------------------------------


def test_multicode_distances_hand_and_brute_force():
    q = np.array([[[0b1], [0b11]]], np.uint8)  # one query, two regions
    x = np.array([[[0b11], [0b0]], [[0b111], [0b1]]], np.uint8)
    # aligned: |1^3| + |3^0| = 1 + 2 = 3; |1^7| + |3^1| = 2 + 1 = 3
    np.testing.assert_array_equal(multicode_distances(q, x, "aligned"), [[3, 3]])
    # min: region 1 -> min(1, 1) = 1, region 2 -> min(0, 2) = 0 → 1; item 2: min(2,0)+min(1,1)=1
    np.testing.assert_array_equal(multicode_distances(q, x, "min"), [[1, 1]])
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (5, 3, 2), dtype=np.uint8)
    b = rng.integers(0, 256, (40, 4, 2), dtype=np.uint8)
    pair = popcount_reference(a.reshape(15, 2), b.reshape(160, 2)).reshape(5, 3, 40, 4)
    np.testing.assert_array_equal(multicode_distances(a, b, "min"), pair.min(3).sum(1))
    perm = b[:, ::-1]  # reordering an item's regions does not change the min matching
    np.testing.assert_array_equal(multicode_distances(a, perm, "min"), pair.min(3).sum(1))


def test_multicode_hasher(clustered):
    x, y = clustered
    rng = np.random.default_rng(4)
    regions = x[:, None, :] + 0.7 * rng.standard_normal((len(x), 4, D))  # 4 noisy views
    mc = MultiCodeHasher(ITQHasher(16, random_state=0), match="min").fit(regions[:300])
    codes = mc.transform(regions)
    assert codes.shape == (len(x), 4, 2) and codes.dtype == np.uint8
    d = mc.distances(codes, codes).astype(np.float64)
    np.fill_diagonal(d, np.inf)
    rel = y[:, None] == y[None, :]
    np.fill_diagonal(rel, False)
    multi = ranking_metrics(-d, rel, ks=(10,))["AP"].mean()
    single = loo_map(ITQHasher(16, random_state=0).fit(regions[:300, 0]).transform(regions[:, 0]), y)
    assert multi > single  # four 16-bit codes of noisy views beat one
    with pytest.raises(ValueError, match="features, but"):
        mc.transform(regions[:, :, :5])
    sup = MultiCodeHasher(KSHHasher(16, random_state=0), match="aligned").fit(regions[:200], y[:200])
    assert sup.transform(regions[:3]).shape == (3, 4, 2)


# --- the benchmark script -----------------------------------------------------------------------


def test_benchmark_script_smoke(tmp_path, monkeypatch):
    """benchmarks/hashing_rsir.py end to end on a tiny classic-encoder store."""
    import importlib.util
    import sys
    from pathlib import Path

    import pandas as pd
    from conftest import make_image_folder

    from rscir.encoders import load_encoder
    from rscir.ingest import index_folder

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "hashing_rsir.py"
    spec = importlib.util.spec_from_file_location("hashing_rsir", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "hashing_rsir", mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    folder = make_image_folder(tmp_path / "archive", {"a": 8, "b": 8, "c": 8}, size=64)
    store = tmp_path / "store"
    index_folder(folder, store, load_encoder("classic"), num_workers=0, progress=False)
    out = tmp_path / "out"
    args = ["--datasets", "", "--store", str(store), "--stores-dir", str(tmp_path / "cache"),
            "--split", "random,heldout", "--bits", "8,16", "--k", "5", "--time-n", "0",
            "--methods", "lsh,itq,ksh,deep,mc-lsh,cmc-klsh,cmc-single", "--cmc-clusters", "2",
            "--out", str(out)]
    assert mod.main(args) == 0
    df = pd.read_csv(out / "hashing_rsir.csv")
    assert set(df["method"]) == {"float (cosine)", "lsh", "itq", "ksh", "deep", "mc-lsh",
                                 "cmc-klsh", "cmc-klsh/max", "cmc-single"}
    assert set(df["split"]) == {"random"}  # a store without the captions test split
    assert df["mAP"].between(0, 1).all()
    df = df[df["relevance"] == "single"]
    assert (df.loc[df["method"] == "mc-lsh", "bytes/img"] == [5, 10]).all()  # 5 codes per image
    # 2 clusters of 4 / 8 bits + 2 presence bits; one cluster of 8 / 16 bits + 1 presence bit
    assert (df.loc[df["method"] == "cmc-klsh", "bytes/img"] == [2, 3]).all()
    assert (df.loc[df["method"] == "cmc-single", "bytes/img"] == [2, 3]).all()
    md = (out / "hashing_rsir.md").read_text()
    assert "float (cosine)" in md and "Beside the seed" in md and "0.904" in md
    assert mod.main(["--bits", "12", "--datasets", ""]) == 2
    assert mod.main(["--methods", "sh", "--datasets", ""]) == 2


@pytest.mark.parametrize(("kernel", "floor"), [("rbf", np.exp(-0.5)), ("laplacian", np.exp(-1.0))])
def test_gamma_heuristic_scales_the_kernel_to_the_data(kernel: str, floor: float) -> None:
    """γ = 1/(2·mean ‖x−a‖²) (rbf) or 1/mean ‖x−a‖₁ (laplacian) makes γ·mean distance 1/2 or 1,
    so by Jensen the mean kernel value is at least e^(−1/2) or e^(−1), whatever the dimension
    and scale (a laplacian scaled by the L2 distance gave ~e^(−6) at d = 256)."""
    from rscir.hashing.kernel import AnchorKernel

    X = 7.0 * np.random.default_rng(0).normal(size=(400, 256))
    ak = AnchorKernel.fit(X, 50, kernel, None, np.random.RandomState(0))
    k = ak(X)
    assert floor <= k.mean() < 1.0
