"""`--ray` with chips and band stacks: the Ray driver builds the same store as the local one
(same chip paths, footprints, datetimes, empty chips, embeddings)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import local_ray
from geo_fixtures import bigearthnet_v1, s2_scene

from rscir.ingest import index_folder
from rscir.stores import DirectoryStore

ray = pytest.importorskip("ray")

COLS = ["path", "size", "mtime_ns", "width", "height", "label", "lon", "lat", "datetime", "crs",
        "footprint", "footprint_native"]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    with local_ray() as address:
        yield address


def same_store(a: Path, b: Path) -> None:
    x, y = DirectoryStore.open(a), DirectoryStore.open(b)
    ix = x.items.sort_values("path").reset_index(drop=True)
    iy = y.items.sort_values("path").reset_index(drop=True)
    pd.testing.assert_frame_equal(ix[COLS], iy[COLS])
    assert [sorted(v) for v in ix["labels"]] == [sorted(v) for v in iy["labels"]]
    ex = x.vectors_for_ids(ix["id"].to_numpy())
    ey = y.vectors_for_ids(iy["id"].to_numpy())
    np.testing.assert_allclose(ex, ey, atol=2e-3)


def test_ray_chips_and_band_stacks_equal_local(tmp_path: Path, ray_address: str,
                                               tiny_encoder) -> None:
    from rscir.ingest.ray_data import index_folder_ray

    arch = tmp_path / "arch"
    s2_scene(arch / "s2.tif", 260, 170)
    kw = dict(chip_size=100, sensor="sentinel2-l2a", progress=False)
    loc = index_folder(arch, tmp_path / "local", tiny_encoder, num_workers=0, **kw)
    rep = index_folder_ray(arch, tmp_path / "ray", model="rscir-tiny", device="cpu",
                           address=ray_address, batch_size=4, **kw)
    assert (rep.embedded, rep.empty_chips, rep.chips) == (loc.embedded, loc.empty_chips, 6)
    same_store(tmp_path / "local", tmp_path / "ray")
    rep = index_folder_ray(arch, tmp_path / "ray", address=ray_address, **kw)
    assert rep.embedded == 0 and rep.already_indexed == 6

    ben = tmp_path / "ben"
    bigearthnet_v1(ben)
    index_folder(ben, tmp_path / "ben-local", tiny_encoder, num_workers=0, progress=False)
    rep = index_folder_ray(ben, tmp_path / "ben-ray", model="rscir-tiny", device="cpu",
                           address=ray_address, progress=False)
    assert rep.embedded == 4 and not rep.bad
    same_store(tmp_path / "ben-local", tmp_path / "ben-ray")
