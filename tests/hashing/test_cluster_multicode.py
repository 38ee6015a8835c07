"""Cluster-sensitive multi-code hashing: region descriptors, per-cluster descriptors with the
posterior threshold, code layout, and the multi-hash-code matching (rscir.hashing)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from rscir.hashing import (
    ClusterMultiCodeHasher,
    KSHHasher,
    RegionDescriber,
    cluster_multicode_distances,
    split_cluster_codes,
)
from rscir.hashing.clustercode import RegionSets
from rscir.hashing.regions import FEATURE_NAMES, describe_regions


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Small arrays: BLAS/OpenMP threads only add waiting (minutes instead of seconds for KSH's
    eigen-solves on a busy 2-core machine)."""
    with threadpool_limits(limits=1):
        yield


def pack(bits: list[list[int]]) -> np.ndarray:
    return np.packbits(np.array(bits, bool), axis=1)


# --- matching -----------------------------------------------------------------------------------


def test_matching_hand_built():
    """3 clusters of 4 bits + 3 presence bits (15 bits, 2 bytes per image)."""
    #            cluster 0     cluster 1     cluster 2   presence
    q = pack([[1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1]])  # clusters 0 and 2 present
    x = pack([
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1],  # same codes on 0 and 2, 1 differs
        [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1],  # 4 + (4 on cluster 1, skipped) + 4
        [1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0],  # 1 on cluster 0; cluster 2 absent in x
    ])
    # cluster 1 is absent from the query: skipped whatever the item holds there
    np.testing.assert_array_equal(cluster_multicode_distances(q, x, 3, 4), [[0, 8, 2]])
    # absent="max": item 2 lacks cluster 2, which costs the full 4 bits instead of its code's 1
    np.testing.assert_array_equal(cluster_multicode_distances(q, x, 3, 4, absent="max"),
                                  [[0, 8, 5]])
    bits, present = split_cluster_codes(x, 3, 4)
    assert bits.shape == (3, 3, 4) and present.tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 0]]
    with pytest.raises(ValueError, match="bytes per code"):
        cluster_multicode_distances(q, np.zeros((2, 3), np.uint8), 3, 4)
    with pytest.raises(ValueError, match="unknown absent"):
        cluster_multicode_distances(q, x, 3, 4, absent="min")


def test_matching_equals_brute_force():
    rng = np.random.default_rng(0)
    k, b = 5, 7  # 35 + 5 bits = 5 bytes
    qb, xb = rng.random((6, k * b + k)) < 0.5, rng.random((40, k * b + k)) < 0.5
    q, x = np.packbits(qb, axis=1), np.packbits(xb, axis=1)
    ref = np.zeros((6, 40), int)
    ref_max = np.zeros((6, 40), int)
    for i in range(6):
        for j in range(40):
            for c in range(k):
                if qb[i, k * b + c]:
                    h = int((qb[i, c * b : (c + 1) * b] != xb[j, c * b : (c + 1) * b]).sum())
                    ref[i, j] += h
                    ref_max[i, j] += h if xb[j, k * b + c] else b
    np.testing.assert_array_equal(cluster_multicode_distances(q, x, k, b, max_elems=50), ref)
    np.testing.assert_array_equal(cluster_multicode_distances(q, x, k, b, absent="max"), ref_max)


# --- per-cluster descriptors ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_kinds() -> tuple[list[np.ndarray], ClusterMultiCodeHasher]:
    """Regions of two well-separated kinds (around (0, 0) and (10, 10)); image i has 1-4 regions
    of kind A, of kind B, or of both."""
    rng = np.random.default_rng(1)
    sets = []
    for i in range(60):
        kinds = [(0.0, 0.0)] * (i % 3 != 1) + [(10.0, 10.0)] * (i % 3 != 0)
        sets.append(np.concatenate([np.array(c) + 0.5 * rng.standard_normal((1 + i % 4, 2))
                                    for c in kinds]))
    h = ClusterMultiCodeHasher(8, n_clusters=2, threshold=0.5, random_state=0).fit(sets)
    return sets, h


def test_cluster_descriptor_mean_or_zero(two_kinds):
    sets, h = two_kinds
    a = int(h.gmm_.predict(h.scaler_.transform([[0.0, 0.0]]))[0])  # component of kind A
    desc, present = h._cluster_descriptors(RegionSets.from_list(sets))
    zero = h.scaler_.transform(np.zeros((1, 2)))[0]
    for i in (0, 1, 2):  # A and B; A only... by construction i % 3: 0 -> A only, 1 -> B only
        s = sets[i]
        is_a = s[:, 0] < 5
        assert present[i, a] == is_a.any() and present[i, 1 - a] == (~is_a).any()
        for c, mask in ((a, is_a), (1 - a, ~is_a)):
            want = h.scaler_.transform(s[mask].mean(0, keepdims=True))[0] if mask.any() else zero
            np.testing.assert_allclose(desc[i, c], want, atol=1e-9)
    # a region half-way between the kinds passes T = 0.5 for neither cluster when T is high
    mid = [np.array([[5.0, 5.0]])]
    strict = ClusterMultiCodeHasher(8, n_clusters=2, threshold=1.0, random_state=0).fit(sets)
    post = strict.gmm_.predict_proba(strict.scaler_.transform(mid[0]))
    d_mid, p_mid = strict._cluster_descriptors(RegionSets.from_list(mid))
    assert post.max() < 1.0 and not p_mid.any()  # no region reaches T: zero descriptors
    np.testing.assert_allclose(d_mid[0], strict.scaler_.transform(np.zeros((2, 2))), atol=1e-9)


def test_codes_layout_and_presence(two_kinds):
    sets, h = two_kinds
    codes = h.transform(sets)
    assert codes.shape == (60, 3) and codes.dtype == np.uint8  # 2 × 8 + 2 bits -> 3 bytes
    _, present = split_cluster_codes(codes, 2, 8)
    _, want = h._cluster_descriptors(RegionSets.from_list(sets))
    np.testing.assert_array_equal(present, want)
    assert present.sum(axis=1).min() >= 1
    # an image without any region: every cluster absent, distance 0 to everything as a query
    empty = h.transform([np.zeros((0, 2))])
    assert not split_cluster_codes(empty, 2, 8)[1].any()
    assert (h.distances(empty, codes) == 0).all()
    # images of the same kinds are closer than images of the other kind
    d = h.distances(codes, codes)
    same = (np.arange(60)[:, None] % 3) == (np.arange(60)[None, :] % 3)
    assert d[same].mean() < d[~same].mean()
    rows, dist = h.search(codes[:4], codes, 5)
    np.testing.assert_array_equal(dist, np.sort(d[:4], axis=1)[:, :5])


def test_deterministic_for_seed(two_kinds):
    sets, _ = two_kinds
    a = ClusterMultiCodeHasher(6, n_clusters=3, random_state=5).fit(sets).transform(sets)
    b = ClusterMultiCodeHasher(6, n_clusters=3, random_state=5).fit(sets).transform(sets)
    np.testing.assert_array_equal(a, b)
    c = ClusterMultiCodeHasher(6, n_clusters=3, random_state=6).fit(sets).transform(sets)
    assert not np.array_equal(a, c)


def test_class_sensitive_variant(two_kinds):
    sets, _ = two_kinds
    y = np.arange(60) % 3
    h = ClusterMultiCodeHasher(8, n_clusters=2, hasher=KSHHasher(n_anchors=30, max_iter=10),
                               random_state=0).fit(sets, y)
    assert all(isinstance(k, KSHHasher) for k in h.hashers_)
    with pytest.raises(ValueError, match="requires y"):
        ClusterMultiCodeHasher(8, n_clusters=2, hasher=KSHHasher()).fit(sets)


def test_bad_input(two_kinds):
    sets, h = two_kinds
    with pytest.raises(ValueError, match="features"):
        h.transform([np.zeros((3, 5))])
    with pytest.raises(ValueError, match="n_bits"):
        ClusterMultiCodeHasher(0).fit(sets)
    with pytest.raises(ValueError, match="at least 4 training regions"):
        ClusterMultiCodeHasher(8, n_clusters=4).fit([np.zeros((1, 2)), np.ones((2, 2))])
    with pytest.raises(ValueError, match="different lengths"):
        ClusterMultiCodeHasher(8, n_clusters=1).fit([np.zeros((2, 2)), np.zeros((2, 3))])


# --- images and region descriptors ---------------------------------------------------------------


def test_region_descriptors_hand_computed():
    """Two rectangles, left red and right blue, 64 × 32 px each: colour, area, shape."""
    rgb = np.zeros((64, 64, 3))
    rgb[:, :32, 0] = 1.0
    rgb[:, 32:, 2] = 1.0
    labels = np.zeros((64, 64), int)
    labels[:, 32:] = 1
    d = describe_regions(rgb, labels)
    col = {n: i for i, n in enumerate(FEATURE_NAMES)}
    assert d.shape == (2, len(FEATURE_NAMES))
    np.testing.assert_allclose(d[:, col["area"]], [0.5, 0.5])
    np.testing.assert_allclose(d[:, col["extent"]], [1.0, 1.0])
    # a 64 × 32 block: pixel-coordinate variances (64² − 1)/12 and (32² − 1)/12
    np.testing.assert_allclose(d[:, col["eccentricity"]], np.sqrt(1 - 1023 / 4095))
    np.testing.assert_allclose(d[:, col["L_std"]], 0.0, atol=1e-6)  # flat colour
    assert d[0, col["a_mean"]] > 0.5 and d[1, col["b_mean"]] < -0.5  # red: a* > 0; blue: b* < 0
    lbp = d[:, col["lbp_0"] : col["lbp_9"] + 1]
    np.testing.assert_allclose(lbp.sum(axis=1), 1.0)
    # boundary pixels: the 4 sides of each block (inner boundary), 2·64 + 2·32 − 4 = 188 each
    np.testing.assert_allclose(d[:, col["compactness"]], 4 * np.pi * 2048 / 188**2)


def test_fit_on_images_equals_fit_on_descriptors():
    rng = np.random.default_rng(0)
    ims = []
    for i in range(8):
        arr = np.zeros((48, 48, 3), np.uint8)
        arr[:, : 8 + 4 * i] = (200, 40, 40) if i % 2 else (40, 160, 40)
        arr[:, 8 + 4 * i :] = (30, 30, 180)
        ims.append(Image.fromarray(np.clip(arr + rng.integers(0, 20, arr.shape), 0, 255)
                                   .astype(np.uint8)))
    describer = RegionDescriber("felzenszwalb", size=48, min_size=32)
    h1 = ClusterMultiCodeHasher(8, n_clusters=2, describer=describer, random_state=0).fit(ims)
    sets = describer.describe(ims)
    h2 = ClusterMultiCodeHasher(8, n_clusters=2, random_state=0).fit(sets)
    np.testing.assert_array_equal(h1.transform(ims), h2.transform(sets))
    assert h1.n_features_in_ == len(FEATURE_NAMES)
    batch = np.stack([np.asarray(im) for im in ims])  # a 4-D batch is images too
    np.testing.assert_array_equal(h1.transform(batch), h1.transform(ims))
    with pytest.raises(ValueError, match="unknown segmentation"):
        RegionDescriber("watershed")
