"""DeepMetricHasher: the loss terms, the codes, and its place among the other hashers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from rscir.bench.metrics import ranking_metrics
from rscir.hashing import (
    DeepMetricHasher,
    HammingIndex,
    HashSearch,
    KSHHasher,
    hamming_distances,
    hamming_topk,
    pack_bits,
    unpack_bits,
)
from rscir.hashing.deep import triplet_loss

FAST = {"epochs": 150, "batch_size": 64, "lr": 1e-2, "dropout": 0.0, "hidden_layer_sizes": (64,)}


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Small arrays: BLAS/OpenMP threads only add waiting (minutes instead of seconds for KSH's
    eigen-solves on a busy 2-core machine)."""
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def rings() -> tuple[np.ndarray, np.ndarray]:
    """4 classes on concentric rings in 2-D plus 6 noise dimensions: no linear direction
    separates them, so a ranking needs a non-linear map."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    ang = rng.uniform(0, 2 * np.pi, 300)
    r = 1.0 + y + 0.15 * rng.standard_normal(300)
    x = np.column_stack([r * np.cos(ang), r * np.sin(ang), 0.5 * rng.standard_normal((300, 6))])
    return x, y


def test_triplet_loss_hand_computed():
    """3 codes: a and p share a label, n does not; d = ‖·‖²/K."""
    u = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])  # a, p, n
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # d(a,p) = 4/2 = 2, d(a,n) = 8/2 = 4, d(p,n) = 4/2 = 2
    # triplets (a,p,n): max(0, m + 2 − 4); (p,a,n): max(0, m + 2 − 2) = m
    assert float(triplet_loss(u, labels, 1.0)) == pytest.approx(1.0)  # only (p,a,n) active: 1
    assert float(triplet_loss(u, labels, 3.0)) == pytest.approx((1.0 + 3.0) / 2)
    assert float(triplet_loss(u, torch.ones(3, 1), 1.0)) == 0.0  # no negative: no triplet


def test_triplet_loss_equals_the_cube():
    g = torch.Generator().manual_seed(0)
    u = torch.tanh(torch.randn(30, 16, generator=g))
    lab = (torch.rand(30, 5, generator=g) < 0.3).float()
    d = ((u[:, None, :] - u[None, :, :]) ** 2).sum(-1) / 16
    sim = (lab @ lab.T) > 0
    valid = (sim & ~torch.eye(30, dtype=torch.bool))[:, :, None] & ~sim[:, None, :]
    viol = torch.relu(0.7 + d[:, :, None] - d[:, None, :]) * valid
    ref = viol.sum() / (viol > 1e-12).sum()
    assert float(triplet_loss(u, lab, 0.7)) == pytest.approx(float(ref), rel=1e-5)


def loo_map(codes: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out mAP; relevant = same class (1-D y) or a shared label (2-D y)."""
    d = hamming_distances(codes, codes).astype(np.float64)
    np.fill_diagonal(d, np.inf)
    rel = y[:, None] == y[None, :] if y.ndim == 1 else (y @ y.T) > 0
    np.fill_diagonal(rel, False)
    return float(ranking_metrics(-d, rel, ks=(10,))["AP"].mean())


def test_beats_random_and_ksh_on_held_out_items(rings):
    x, y = rings
    tr, te = slice(0, 220), slice(220, None)
    deep = DeepMetricHasher(16, random_state=0, **FAST).fit(x[tr], y[tr])
    codes = deep.transform(x)
    rnd = pack_bits(np.random.default_rng(0).random((len(x), 16)) < 0.5)
    ksh = KSHHasher(16, n_anchors=100, random_state=0).fit(x[tr], y[tr]).transform(x)
    m_deep, m_rnd, m_ksh = (loo_map(c[te], y[te]) for c in (codes, rnd, ksh))
    assert m_rnd < 0.35
    assert m_deep > 0.8 and m_deep > m_ksh + 0.03, (m_deep, m_ksh, m_rnd)
    # quantization: the continuous codes sit near ±1; balance: every bit splits the data
    u = np.tanh(deep.decision_function(x[tr]))
    assert np.abs(u).mean() > 0.9
    assert np.abs(unpack_bits(codes[tr]).mean(axis=0) - 0.5).max() < 0.35
    assert deep.loss_curve_[-1] < deep.loss_curve_[0]
    assert deep.n_iter_ == FAST["epochs"] * 3  # 220 // 64 full batches per epoch


def test_multilabel_targets():
    """6 Gaussian clusters; labels: the cluster, and "A" on clusters 0-2 — relevance = a shared
    label, so clusters 0-2 are all relevant to each other."""
    rng = np.random.default_rng(2)
    c = rng.integers(0, 6, 300)
    x = 3.0 * rng.standard_normal((6, 10))[c] + rng.standard_normal((300, 10))
    multi = np.zeros((300, 7), int)
    multi[np.arange(300), c] = 1
    multi[:, 6] = c < 3
    codes = DeepMetricHasher(16, random_state=0, **FAST).fit(x[:220], multi[:220]).transform(x)
    rnd = pack_bits(np.random.default_rng(0).random((len(x), 16)) < 0.5)
    m, m_rnd = loo_map(codes[220:], multi[220:]), loo_map(rnd[220:], multi[220:])
    assert m > 0.9 and m > m_rnd + 0.3, (m, m_rnd)
    # the shared label pulls clusters 0-2 together: closer to each other than to clusters 3-5
    d = hamming_distances(codes[220:], codes[220:])
    ct = c[220:]
    low = (ct[:, None] < 3) & (ct[None, :] < 3) & (ct[:, None] != ct[None, :])
    across = (ct[:, None] < 3) & (ct[None, :] >= 3)
    assert d[low].mean() < d[across].mean()


def test_deterministic_and_leaves_torch_state_alone(rings):
    x, y = rings
    torch.manual_seed(123)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    a = DeepMetricHasher(8, random_state=5, epochs=3).fit(x, y).transform(x)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    b = DeepMetricHasher(8, random_state=5, epochs=3).fit(x, y).transform(x)
    np.testing.assert_array_equal(a, b)
    c = DeepMetricHasher(8, random_state=6, epochs=3).fit(x, y).transform(x)
    assert not np.array_equal(a, c)


def test_plugs_into_hamming_index_and_hash_search(rings):
    x, y = rings
    h = DeepMetricHasher(32, random_state=0, epochs=5).fit(x, y)
    codes = h.transform(x)
    dist, rows = HammingIndex(32).add(codes).search(codes[:7], 9)
    ref_d, ref_rows = hamming_topk(codes[:7], codes, 9)
    np.testing.assert_array_equal(dist, ref_d)
    np.testing.assert_array_equal(rows, ref_rows)
    hs_rows, scores = HashSearch(h).add(x).search(x[:7], 9)
    np.testing.assert_array_equal(hs_rows, ref_rows)
    np.testing.assert_allclose(scores, 1 - ref_d / 32)


def test_bad_params(rings):
    x, y = rings
    with pytest.raises(ValueError, match="requires y"):
        DeepMetricHasher(8).fit(x)
    with pytest.raises(ValueError, match="dropout"):
        DeepMetricHasher(8, dropout=1.0).fit(x, y)
    with pytest.raises(ValueError, match="hidden_layer_sizes"):
        DeepMetricHasher(8, hidden_layer_sizes=(0,)).fit(x, y)
    with pytest.raises(ValueError, match="multiple of 8"):
        DeepMetricHasher(12).fit(x, y)
