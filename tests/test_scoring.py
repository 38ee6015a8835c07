"""Every fusion equals an independent per-query brute-force computation of its formula."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from rscir.scoring import METHODS, QueryStats, fuse, norm_cdf, topk


def brute(method: str, si: np.ndarray, st: np.ndarray, lam: float) -> np.ndarray:
    out = np.empty_like(si, dtype=np.float64)
    for q in range(si.shape[0]):
        a, b = si[q].astype(np.float64), st[q].astype(np.float64)
        if method == "image":
            out[q] = a
        elif method == "text":
            out[q] = b
        elif method == "average":
            out[q] = (a + b) / 2
        elif method == "sum":
            out[q] = a + b
        elif method == "product":
            out[q] = a * b
        else:
            za = (a - a.mean()) / np.std(a, ddof=1)
            zb = (b - b.mean()) / np.std(b, ddof=1)
            out[q] = lam * norm.cdf(zb) + (1 - lam) * norm.cdf(za)
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0])
def test_fuse_equals_brute_force(method: str, lam: float) -> None:
    rng = np.random.default_rng(1)
    si = rng.uniform(-0.2, 0.9, (5, 200))
    st = rng.uniform(-0.1, 0.4, (5, 200))
    np.testing.assert_allclose(fuse(method, si, st, lam), brute(method, si, st, lam), atol=1e-12)


def test_norm_cdf_hand_computed_unbiased_std() -> None:
    # mean 2, unbiased std 1 -> z = -1, 0, 1 (the biased std sqrt(2/3) would give ±1.2247)
    out = norm_cdf(np.array([[1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(out, [[0.15865525393145707, 0.5, 0.8413447460685429]], atol=1e-12)


def test_normalization_is_over_whole_archive_per_query() -> None:
    rng = np.random.default_rng(2)
    s = rng.normal(size=(3, 50))
    full = norm_cdf(s)
    # scoring a slice with the full archive's stats gives the same values as the full scan
    stats = QueryStats.of(s)
    np.testing.assert_allclose(norm_cdf(s[:, 10:20], stats), full[:, 10:20], atol=1e-12)
    # ... and differs from normalizing the slice alone
    assert not np.allclose(norm_cdf(s[:, 10:20]), full[:, 10:20])
    # rows are independent: query 0's values don't depend on query 1
    s2 = s.copy()
    s2[1] *= 7
    np.testing.assert_allclose(norm_cdf(s2)[0], full[0])


def test_weicom_extreme_lambdas_equal_unimodal_orders() -> None:
    rng = np.random.default_rng(3)
    si, st = rng.normal(size=(4, 300)), rng.normal(size=(4, 300))
    for q in range(4):
        assert np.array_equal(
            np.argsort(-fuse("weicom", si, st, 0.0)[q], kind="stable"), np.argsort(-si[q], kind="stable")
        )
        assert np.array_equal(
            np.argsort(-fuse("weicom", si, st, 1.0)[q], kind="stable"), np.argsort(-st[q], kind="stable")
        )


def test_fuse_validates_inputs() -> None:
    s = np.zeros((1, 3))
    with pytest.raises(ValueError, match="unknown method"):
        fuse("max", s, s)
    with pytest.raises(ValueError, match="needs a query text"):
        fuse("weicom", s, None)
    with pytest.raises(ValueError, match="needs a query image"):
        fuse("average", None, s)
    with pytest.raises(ValueError, match="lambda"):
        fuse("weicom", s, s, 1.5)


def test_topk_matches_full_sort() -> None:
    rng = np.random.default_rng(4)
    s = rng.normal(size=(6, 1000))
    idx, vals = topk(s, 15)
    ref = np.argsort(-s, axis=1)[:, :15]
    assert np.array_equal(idx, ref)
    np.testing.assert_array_equal(vals, np.take_along_axis(s, ref, 1))
    idx_all, _ = topk(s[:, :5], 50)
    assert idx_all.shape == (6, 5)


def test_topk_ties_by_lower_index_also_at_the_kth_place() -> None:
    s = np.array([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, np.nan, 2.0]])
    idx, vals = topk(s, 4)  # 3, 3, then the first two of the four 2s
    assert idx.tolist() == [[1, 3, 2, 4]] and vals.tolist() == [[3.0, 3.0, 2.0, 2.0]]
    idx, vals = topk(s, 8)  # NaN ranks last
    assert idx[0].tolist() == [1, 3, 2, 4, 5, 7, 0, 6] and np.isnan(vals[0, -1])
    rng = np.random.default_rng(5)
    r = rng.integers(0, 4, size=(50, 300)).astype(np.float32)  # ties everywhere
    idx, _ = topk(r, 17)
    assert np.array_equal(idx, np.argsort(-r, axis=1, kind="stable")[:, :17])
