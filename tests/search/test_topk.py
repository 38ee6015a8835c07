"""Threshold-algorithm top-k over sorted streams equals brute force with exact streams."""

from __future__ import annotations

import numpy as np
import pytest

from rscir.encoders.base import l2_normalize
from rscir.moments import Moments, query_stats
from rscir.scoring import METHODS, fuse, topk
from rscir.search.topk import ExactSource, _weicom_line_bound, composed_topk


def _archive(n: int, d: int, seed: int, *, positive: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, d))
    x = centers[rng.integers(0, 8, n)] + 0.8 * rng.normal(size=(n, d))
    if positive:  # all-positive features: every similarity is > 0 (product is then monotone)
        x = np.abs(x)
    return l2_normalize(x).astype(np.float16)


def _brute(x, qi, qt, method, lam, k):
    si = qi.astype(np.float64) @ x.astype(np.float64).T
    st = qt.astype(np.float64) @ x.astype(np.float64).T
    m = Moments.of(x)
    f = fuse(method, si, st, lam, img_stats=query_stats(qi, m), txt_stats=query_stats(qt, m))
    return topk(f, k)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_equals_brute_force(method: str, lam: float, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n, d = [(800, 16), (3000, 32), (1500, 8)][seed]
    x = _archive(n, d, seed)
    qi = x[rng.integers(0, n, 3)].astype(np.float32)
    qt = l2_normalize(rng.normal(size=(3, d)))
    m = Moments.of(x)
    k = [1, 10, 25][seed]
    res = composed_topk(
        x, qi, qt, method, lam, k,
        img_stats=query_stats(qi, m), txt_stats=query_stats(qt, m),
    )
    b_rows, b_scores = _brute(x, qi, qt, method, lam, k)
    np.testing.assert_allclose(res.scores, b_scores, rtol=0, atol=1e-9)
    assert np.array_equal(res.rows, b_rows)
    assert res.certified.all()


def test_product_with_negative_similarities_needs_bottom_streams() -> None:
    """Two strongly negative similarities give the best product: TA must still find them."""
    d = 4
    x = np.zeros((200, d))
    rng = np.random.default_rng(0)
    x[:, 2:] = rng.normal(size=(200, 2))  # orthogonal to both queries: products ~0
    x[0] = [-0.7, -0.7, 0.1, 0.1]  # a = b = -0.7 -> product 0.49, the best
    x[1] = [0.5, 0.3, 0.5, 0.5]  # a = 0.5, b = 0.3 -> product 0.15
    x = l2_normalize(x)
    qi, qt = np.array([[1.0, 0, 0, 0]]), np.array([[0, 1.0, 0, 0]])
    res = composed_topk(x, qi, qt, "product", 0.5, 2, start_depth=1)
    assert res.rows[0, 0] == 0
    assert np.array_equal(res.rows, _brute(x, qi, qt, "product", 0.5, 2)[0])


def test_exclude_rows_and_small_archives() -> None:
    x = _archive(50, 8, 3)
    qi = x[[7]].astype(np.float32)
    qt = l2_normalize(np.ones((1, 8)))
    m = Moments.of(x)
    kw = {"img_stats": query_stats(qi, m), "txt_stats": query_stats(qt, m)}
    res = composed_topk(x, qi, qt, "weicom", 0.2, 5, exclude_rows=[7], **kw)
    assert 7 not in res.rows[0]
    full = composed_topk(x, qi, qt, "weicom", 0.2, 6, **kw)
    assert np.array_equal(res.rows[0], [r for r in full.rows[0] if r != 7][:5])
    # k larger than the archive: every item once, padded with -1 / -inf
    big = composed_topk(x[:4], qi, qt, "sum", 0.5, 6)
    assert sorted(big.rows[0, :4].tolist()) == [0, 1, 2, 3]
    assert (big.rows[0, 4:] == -1).all() and np.isneginf(big.scores[0, 4:]).all()


def test_stops_early_and_reads_less_than_the_archive() -> None:
    """On a clustered archive the bound stops TA long before the streams are exhausted."""
    x = _archive(20000, 32, 4, positive=True)
    rng = np.random.default_rng(5)
    qi = x[rng.integers(0, 20000, 4)].astype(np.float32)
    qt = x[rng.integers(0, 20000, 4)].astype(np.float32)
    m = Moments.of(x)
    res = composed_topk(x, qi, qt, "weicom", 0.5, 10,
                        img_stats=query_stats(qi, m), txt_stats=query_stats(qt, m))
    assert (res.depth < 20000).all()
    assert np.array_equal(res.rows, _brute(x, qi, qt, "weicom", 0.5, 10)[0])


def test_capped_depth_is_not_certified() -> None:
    x = _archive(5000, 16, 6)
    rng = np.random.default_rng(7)
    qi = x[rng.integers(0, 5000, 2)].astype(np.float32)
    qt = l2_normalize(rng.normal(size=(2, 16)))
    res = composed_topk(x, qi, qt, "product", 0.5, 10, max_depth=40)
    assert (res.depth <= 40).all()
    assert not res.certified.all()


def test_line_bound_is_an_upper_bound() -> None:
    """The WeiCom bound with the combined stream dominates every feasible point."""
    from scipy.special import ndtr

    rng = np.random.default_rng(8)
    for lam in (0.2, 0.5, 0.8):
        zi, zt = rng.normal(2, 1, (50, 1)), rng.normal(2, 1, (50, 1))
        line = (1 - lam) * zi + lam * zt - rng.uniform(0, 2, (50, 1))
        ub = _weicom_line_bound(lam, zi, zt, line)
        # sample feasible points: z_i <= zi, z_t <= zt, (1-λ)z_i + λz_t <= line
        pi = zi - rng.exponential(1.0, (50, 2000))
        pt = np.minimum(zt, (line - (1 - lam) * pi) / lam)
        vals = lam * ndtr(pt) + (1 - lam) * ndtr(pi)
        assert (vals.max(axis=1, keepdims=True) <= ub + 1e-12).all()
        # and the bound is tight to within a grid cell
        corner = lam * ndtr(zt) + (1 - lam) * ndtr(zi)
        assert (ub <= corner + 1e-12).all()


def test_weicom_requires_stats_and_bad_args() -> None:
    x = _archive(30, 4, 9)
    q = x[:1].astype(np.float32)
    with pytest.raises(ValueError, match="statistics"):
        composed_topk(x, q, q, "weicom", 0.5, 3)
    with pytest.raises(ValueError, match="needs a query text"):
        composed_topk(x, q, None, "sum", 0.5, 3)
    with pytest.raises(ValueError, match="k must be"):
        composed_topk(x, q, q, "sum", 0.5, 0)
    assert ExactSource(x).search(q, 100).shape == (1, 30)
