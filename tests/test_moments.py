"""Moment-based WeiCom normalization equals the full scan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rscir.encoders.base import ModelInfo, l2_normalize
from rscir.moments import ArchiveMoments, Moments, query_stats
from rscir.scoring import QueryStats, fuse
from rscir.stores import DirectoryStore


def _archive(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(5, d))
    x = centers[rng.integers(0, 5, n)] + 0.5 * rng.normal(size=(n, d)) + 2.0  # offset mean
    return l2_normalize(x)


def test_hand_computed_two_items() -> None:
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    q = np.array([[1.0, 0.0], [0.6, 0.8]])
    st = query_stats(q, Moments.of(x))
    # q1: sims (1, 0) -> mean 0.5, unbiased std sqrt(0.5); q2: sims (0.6, 0.8) -> 0.7, sqrt(0.02)
    np.testing.assert_allclose(st.mean[:, 0], [0.5, 0.7])
    np.testing.assert_allclose(st.std[:, 0], [np.sqrt(0.5), np.sqrt(0.02)])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_equals_full_scan(dtype: type) -> None:
    x = _archive(3000, 48, 0).astype(dtype)
    q = l2_normalize(np.random.default_rng(1).normal(size=(7, 48)))
    full = QueryStats.of(q.astype(np.float64) @ x.astype(np.float64).T)
    st = query_stats(q, Moments.of(x))
    assert st.mean.shape == (7, 1) and st.std.shape == (7, 1)
    np.testing.assert_allclose(st.mean, full.mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(st.std, full.std, rtol=0, atol=1e-6)
    # and hence the WeiCom scores equal the full-scan ones
    si = q @ x.astype(np.float32).T
    st_t = query_stats(q[::-1], Moments.of(x))
    a = fuse("weicom", si, si[::-1], 0.3, img_stats=st, txt_stats=st_t)
    b = fuse("weicom", si, si[::-1], 0.3)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_chunked_of_and_merge_by_addition() -> None:
    x = _archive(1000, 16, 2)
    a = ArchiveMoments.of(x, chunk=128)
    b = ArchiveMoments.from_sums(Moments.of(x[:300]) + Moments.of(x[300:]))
    np.testing.assert_allclose(a.mean, x.astype(np.float64).mean(0), atol=1e-12)
    np.testing.assert_allclose(a.cov, np.cov(x.T.astype(np.float64)), atol=1e-12)
    np.testing.assert_allclose(b.cov, a.cov, atol=1e-12)


def test_constant_similarities_have_zero_std() -> None:
    x = np.tile(np.array([[0.6, 0.8]]), (5, 1))
    st = query_stats(np.array([[1.0, 0.0]]), Moments.of(x))
    assert st.std[0, 0] == pytest.approx(0.0, abs=1e-12)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        query_stats(np.ones((1, 2)), Moments.of(np.ones((1, 2))))
    with pytest.raises(ValueError, match="dim"):
        query_stats(np.ones((1, 3)), Moments.of(np.eye(2)))


def test_store_moments_track_appends_and_supersedes(tmp_path: Path) -> None:
    """Through the store: appends and re-added paths keep moments equal to a full scan."""
    d = 24
    info = ModelInfo(name="t", arch="t", fingerprint="sha256:0", dim=d, backend="test")
    x = _archive(600, d, 3)
    with DirectoryStore.create(tmp_path / "s", info, tmp_path) as st:
        st.add(x[:400], [{"path": f"{i}.jpg"} for i in range(400)])
        st.add(x[400:], [{"path": f"{i}.jpg"} for i in range(400, 600)])
        # re-adding 50 paths with new vectors supersedes their old rows
        st.add(x[:50][::-1], [{"path": f"{i}.jpg"} for i in range(50)])
        assert len(st) == 600
        q = l2_normalize(np.random.default_rng(4).normal(size=(3, d)))
        emb = np.asarray(st.embeddings, np.float64)
        full = QueryStats.of(q @ emb.T)
        got = query_stats(q, st.moments())
        np.testing.assert_allclose(got.mean, full.mean, atol=1e-6)
        np.testing.assert_allclose(got.std, full.std, atol=1e-6)
