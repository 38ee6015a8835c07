"""`--ray` without GPUs: encoder actors on every core decode their own blocks. In file order
(``preserve_order``) the store equals the local one id for id; the default model (rscir-mini,
whose input is a hand-crafted descriptor) goes through the same path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import local_ray, make_image_folder

from rscir.encoders import load_encoder
from rscir.ingest import index_folder
from rscir.stores import DirectoryStore

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    with local_ray() as address:
        yield address


def test_preserve_order_equals_local_id_for_id(tmp_path: Path, ray_address: str,
                                               tiny_encoder) -> None:
    from rscir.ingest.ray_data import index_folder_ray

    folder = make_image_folder(tmp_path / "a", {"beach": 11, "forest": 10, "harbor": 9})
    index_folder(folder, tmp_path / "local", tiny_encoder, num_workers=0, progress=False)
    rep = index_folder_ray(folder, tmp_path / "ray", model="rscir-tiny", device="cpu",
                           address=ray_address, batch_size=4, segment_size=7,
                           preserve_order=True, progress=False)
    assert rep.embedded == 30
    a, b = DirectoryStore.open(tmp_path / "local"), DirectoryStore.open(tmp_path / "ray")
    assert a.items["path"].tolist() == b.items["path"].tolist()
    assert b.ids.tolist() == list(range(30))
    np.testing.assert_allclose(np.asarray(b.embeddings, np.float32),
                               np.asarray(a.embeddings, np.float32), atol=2e-3, rtol=0)


@pytest.mark.realdata
def test_default_model_on_ucm_tiles(tmp_path: Path, ray_address: str,
                                    shared_data: Path) -> None:
    from rscir.ingest.ray_data import index_folder_ray

    src = shared_data / "ucm16" / "images"
    folder = tmp_path / "a"
    for f in sorted(src.glob("*/*.jpg"))[::40]:  # 40 tiles, every class
        (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
        (folder / f.parent.name / f.name).symlink_to(f)
    enc = load_encoder(None, device="cpu")
    index_folder(folder, tmp_path / "local", enc, num_workers=0, progress=False)
    rep = index_folder_ray(folder, tmp_path / "ray", address=ray_address, progress=False)
    assert rep.embedded == 40 and not rep.bad
    a, b = DirectoryStore.open(tmp_path / "local"), DirectoryStore.open(tmp_path / "ray")
    assert b.manifest.model.same_space(a.manifest.model)
    rows = a.rows_for_paths(b.items["path"].tolist())
    # one torch thread per actor vs the local thread count: float16 rounding may differ by an ulp
    np.testing.assert_allclose(np.asarray(b.embeddings, np.float32),
                               np.asarray(a.embeddings, np.float32)[rows], atol=1e-4, rtol=0)
