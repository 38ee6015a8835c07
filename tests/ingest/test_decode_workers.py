"""Decoding on every core: more decode workers give the very same store (ids in file order,
bit-identical embeddings) as decoding in the main process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import make_image_folder

from rscir.ingest import index_folder
from rscir.ingest.local import default_workers
from rscir.stores import DirectoryStore


def test_two_workers_build_the_same_store(tmp_path: Path, tiny_encoder) -> None:
    folder = make_image_folder(tmp_path / "a", {"beach": 9, "forest": 8, "harbor": 7})
    for w in (0, 2):
        index_folder(folder, tmp_path / f"s{w}", tiny_encoder, num_workers=w, batch_size=5,
                     progress=False)
    a, b = DirectoryStore.open(tmp_path / "s0"), DirectoryStore.open(tmp_path / "s2")
    assert len(a) == len(b) == 24
    assert a.items["path"].tolist() == b.items["path"].tolist()  # same ids, file order
    assert a.items["id"].tolist() == b.items["id"].tolist()
    np.testing.assert_array_equal(np.asarray(a.embeddings), np.asarray(b.embeddings))


def test_default_workers_use_every_core(monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_workers() == 2  # was 1: rscir-mini's descriptor runs in the workers
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert default_workers() == 16
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert default_workers() == 1
