"""The store: atomic segments, stable ids, supersession, moments, model checks, dtype."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rscir.encoders.base import ModelInfo, l2_normalize
from rscir.errors import ModelMismatchError, StoreError
from rscir.moments import Moments
from rscir.stores import DirectoryStore

INFO = ModelInfo(name="m", arch="A", fingerprint="sha256:aa", dim=8)


def vecs(n: int, seed: int = 0) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).normal(size=(n, 8)))


def items(names: list[str]) -> list[dict]:
    return [{"path": n, "size": 1, "mtime_ns": 1, "label": n.split("/")[0]} for n in names]


def test_add_open_roundtrip_and_ids(tmp_path: Path) -> None:
    st = DirectoryStore.create(tmp_path / "s", INFO, tmp_path, dtype="float32")
    ids = st.add(vecs(3), items(["a/1.jpg", "a/2.jpg", "b/1.jpg"]))
    assert ids.tolist() == [0, 1, 2]
    ids2 = st.add(vecs(2, 1), items(["b/2.jpg", "a/1.jpg"]))  # a/1 supersedes, keeps id 0
    assert ids2.tolist() == [3, 0]
    st.close()
    ro = DirectoryStore.open(tmp_path / "s")
    assert len(ro) == 4
    assert sorted(ro.items["path"]) == ["a/1.jpg", "a/2.jpg", "b/1.jpg", "b/2.jpg"]
    row = ro.rows_for_ids([0])[0]
    np.testing.assert_allclose(ro.embeddings[row], vecs(2, 1)[1], atol=1e-7)
    with pytest.raises(KeyError):
        ro.rows_for_ids([99])
    assert ro.items_for_ids([3, 0])["path"].tolist() == ["b/2.jpg", "a/1.jpg"]
    with pytest.raises(KeyError):
        ro.items_for_ids([0, 99])


def test_moments_track_live_rows(tmp_path: Path) -> None:
    st = DirectoryStore.create(tmp_path / "s", INFO, tmp_path, dtype="float16")
    st.add(vecs(5), items([f"x/{i}.jpg" for i in range(5)]))
    st.add(vecs(2, 7), items(["x/1.jpg", "x/9.jpg"]))
    m = st.moments()
    ref = Moments.of(st.embeddings)
    assert m.n == ref.n == 6
    np.testing.assert_allclose(m.sum, ref.sum, atol=1e-9)
    np.testing.assert_allclose(m.sumsq, ref.sumsq, atol=1e-9)
    st.compact()
    assert json.loads((st.path / "state.json").read_text())["segments"].__len__() == 1
    np.testing.assert_allclose(st.moments().sumsq, ref.sumsq, atol=1e-9)
    cov = st.moments().cov
    np.testing.assert_allclose(cov, np.cov(st.embeddings.astype(np.float64), rowvar=False), atol=1e-9)


def test_compacted_store_is_memmapped(tmp_path: Path) -> None:
    st = DirectoryStore.create(tmp_path / "s", INFO, tmp_path)
    st.add(vecs(3), items(["1.jpg", "2.jpg", "3.jpg"]))
    st.add(vecs(3, 1), items(["4.jpg", "5.jpg", "6.jpg"]))
    st.compact()
    st.close()
    ro = DirectoryStore.open(tmp_path / "s")
    assert isinstance(ro.embeddings, np.memmap)
    assert ro.embeddings.dtype == np.float16


def test_uncommitted_segment_is_ignored_and_swept(tmp_path: Path) -> None:
    st = DirectoryStore.create(tmp_path / "s", INFO, tmp_path)
    st.add(vecs(2), items(["1.jpg", "2.jpg"]))
    st.close()
    # a writer killed after writing a segment but before committing state.json
    orphan = tmp_path / "s" / "segments" / "seg-999999-dead"
    orphan.mkdir()
    (orphan / "embeddings.npy").write_bytes(b"garbage")
    assert len(DirectoryStore.open(tmp_path / "s")) == 2
    DirectoryStore.open(tmp_path / "s", writable=True).close()
    assert not orphan.exists()


def test_model_mismatch_and_lock(tmp_path: Path) -> None:
    st = DirectoryStore.create(tmp_path / "s", INFO, tmp_path)
    with pytest.raises(StoreError, match="another process"):
        DirectoryStore.open(tmp_path / "s", writable=True)
    st.close()
    other = ModelInfo(name="m2", arch="A", fingerprint="sha256:bb", dim=8)
    with pytest.raises(ModelMismatchError, match="was built with model 'm'"):
        DirectoryStore.open_or_create(tmp_path / "s", other, tmp_path)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="manifest.json is missing"):
        DirectoryStore.open(tmp_path)
    with pytest.raises(StoreError, match="not a directory"):
        DirectoryStore.open(tmp_path / "nope")
    st = DirectoryStore.create(tmp_path / "s", INFO, tmp_path)
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        st.add(np.zeros((2, 3)), items(["1", "2"]))
    with pytest.raises(ValueError, match="NaN"):
        st.add(np.full((1, 8), np.nan), items(["1"]))
    assert len(st) == 0
    ro = DirectoryStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="read-only"):
        ro.add(vecs(1), items(["1"]))
    with pytest.raises(ValueError, match="outside the archive root"):
        ro.resolve_path("../../etc/passwd")
