"""STAC as an archive: an ItemCollection and a Catalog with local hrefs, one asset chipped or
one asset per band, item ids, datetimes and geometry kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from geo_fixtures import stac_catalog, stac_itemcollection

from rscir.cli import main
from rscir.ingest import index_folder
from rscir.ingest.render import item_image
from rscir.stores import DirectoryStore

pytest.importorskip("pystac")
shapely = pytest.importorskip("shapely")


def test_itemcollection_visual_chipped(tmp_path: Path, tiny_encoder) -> None:
    path, its = stac_itemcollection(tmp_path / "stac", n=2, size=200)
    rep = index_folder(path, tmp_path / "s", tiny_encoder, num_workers=0, progress=False,
                       asset="visual", chip_size=100, dtype="float32")
    assert rep.archive == "stac" and rep.scenes == 2 and rep.embedded == 8 and not rep.bad
    st = DirectoryStore.open(tmp_path / "s")
    assert Path(st.root) == (tmp_path / "stac").resolve()
    items = st.items.set_index("path")
    for i, x in enumerate(its):
        iid = x["item"].id
        p = f"items/{iid}/visual.tif#window=100,0,100,100"
        row = items.loc[p]
        assert row["datetime"] == pd.Timestamp(f"2023-06-0{i + 1}T10:20:30Z")
        assert row["label"] is None and row["crs"] == "EPSG:32633"
        chip = x["rgb"][:, :100, 100:].transpose(1, 2, 0)
        assert np.array_equal(np.asarray(item_image(st, p)), chip)
        np.testing.assert_allclose(st.vectors_for_ids([int(row["id"])]),
                                   tiny_encoder.encode_images([chip]), atol=1e-5)
        # the chip's footprint lies inside the item's geometry
        item_geom = shapely.geometry.shape(x["item"].geometry)
        assert item_geom.buffer(1e-6).contains(shapely.from_wkb(row["footprint"]))
    ids = [json.loads(line) for line in
           (tmp_path / "s" / "artifacts" / "ingest" / "sources.jsonl").read_text().splitlines()]
    assert {d["id"] for d in ids} == {x["item"].id for x in its}


def test_catalog_band_assets_cli(tmp_path: Path, tiny_encoder, capsys) -> None:
    path, its = stac_catalog(tmp_path / "cat", n=2, size=64)
    rc = main(["index", str(path), "--store", str(tmp_path / "s"), "--model", "rscir-tiny",
               "--device", "cpu", "--bands", "B04,B03,B02", "--stretch", "0,2550",
               "--no-progress", "--json", "--workers", "0"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["archive"] == "stac" and rep["embedded"] == 2
    st = DirectoryStore.open(tmp_path / "s")
    for x in its:
        row = st.items[st.items["path"].str.contains(x["item"].id)].iloc[0]
        assert row["path"].endswith(f"#item={x['item'].id}")
        # B04/B03/B02 assets hold the visual bands × 10: the stretch 0..2550 gives them back
        assert np.array_equal(np.asarray(item_image(st, row["path"])),
                              x["rgb"].transpose(1, 2, 0))
        assert row["datetime"] is not pd.NaT and row["footprint"] is not None
