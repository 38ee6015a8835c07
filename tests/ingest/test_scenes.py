"""Scenes cut into chips: the grid, chip embeddings equal to the tiles they were cut from, the
footprints (checked against pyproj), nodata chips skipped and counted, sensor presets on a
12-band uint16 scene, thumbnails of chips, resuming after a kill mid-scene, Postgres."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from geo_fixtures import s2_scene, ucm_mosaic, ucm_tiles, write_geotiff

from rscir.errors import InvalidArgumentError, StoreError
from rscir.ingest import ChipSpec, RasterRead, chip_path, index_folder, split_item_path
from rscir.ingest.render import item_image
from rscir.ingest.sensors import S2_L2A, parse_bands, parse_stretch
from rscir.stores import DirectoryStore

shapely = pytest.importorskip("shapely")
pyproj = pytest.importorskip("pyproj")


# --------------------------------------------------------------------------- pure planning
def test_chip_grid_and_path_notation() -> None:
    w = ChipSpec(256).windows(600, 300)  # pad: 3 columns (the last runs to 768), 2 rows
    assert w[:, 0].tolist() == [0, 256, 512, 0, 256, 512]
    assert w[:, 1].tolist() == [0, 0, 0, 256, 256, 256]
    assert (w[:, 2:] == 256).all()
    assert ChipSpec(256, edge="drop").windows(600, 300).tolist() == [[0, 0, 256, 256],
                                                                     [256, 0, 256, 256]]
    assert ChipSpec(256, 128).starts(600).tolist() == [0, 128, 256, 384]  # 384+256 >= 600
    assert ChipSpec(256, 128, "drop").starts(600).tolist() == [0, 128, 256]
    assert ChipSpec(256).starts(100).tolist() == [0]
    assert ChipSpec(256, edge="drop").starts(100).tolist() == []
    assert ChipSpec(64).key == "64/64/pad"
    with pytest.raises(InvalidArgumentError):
        ChipSpec(256, edge="shift").check()
    p = chip_path("a/b c.tif", (512, 0, 256, 256))
    assert p == "a/b c.tif#window=512,0,256,256"
    assert split_item_path(p) == ("a/b c.tif", (512, 0, 256, 256))
    assert split_item_path("a/b.jpg") == ("a/b.jpg", None)


def test_bands_presets_and_stretch() -> None:
    s2 = RasterRead(sensor="sentinel2-l2a")
    assert s2.band_indexes(12) == [4, 3, 2]
    assert RasterRead(parse_bands("B08,B04,B03"), "sentinel2-l2a").band_indexes(12) == [8, 4, 3]
    assert RasterRead(parse_bands("nir08,red,green"), "sentinel2-l2a").band_indexes(12) == [9, 4, 3]
    assert RasterRead(parse_bands("B04,B03,B02")).band_indexes(12, S2_L2A) == [4, 3, 2]
    assert RasterRead(parse_bands("4,3,2")).band_indexes(12) == [4, 3, 2]
    assert RasterRead(parse_bands("5")).band_indexes(12) == [5, 5, 5]
    assert RasterRead(sensor="landsat-c2l2").band_indexes(7) == [4, 3, 2]
    assert RasterRead(sensor="sentinel2-l1c").band_indexes(13) == [4, 3, 2]
    assert RasterRead().band_indexes(4, colorinterp=("blue", "green", "red", "undefined")) == [
        3, 2, 1]
    with pytest.raises(InvalidArgumentError, match="not found"):
        RasterRead(("B04", "B03", "B02")).band_indexes(12)
    with pytest.raises(InvalidArgumentError, match="has 4"):
        RasterRead(parse_bands("5,3,2")).band_indexes(4)
    with pytest.raises(InvalidArgumentError):
        parse_bands("1,2")
    # fixed S2 stretch 0..3000 -> 0..255 (truncated): by hand
    px = np.array([[[0, 1500, 3000, 4000]]] * 3, np.uint16)
    assert s2.to_uint8(px)[0, 0].tolist() == [0, 127, 255, 255]
    # Landsat C2L2: ρ = DN * 0.0000275 - 0.2; ρ 0.15 -> 127
    dn = np.array([[[(0.15 + 0.2) / 0.0000275]]] * 3)
    assert RasterRead(sensor="landsat-c2l2").to_uint8(dn)[0, 0, 0] == 127
    # float reflectance with a fixed stretch; NaN and invalid pixels become 0
    f = np.array([[[0.0, 0.15, np.nan, 0.3]]] * 3, np.float32)
    out = RasterRead(stretch=parse_stretch("0,0.3")).to_uint8(f, np.array([[1, 1, 0, 1]], bool))
    assert out[0, 0].tolist() == [0, 127, 0, 255]
    assert parse_stretch("p1,p99") == ("percentile", 1.0, 99.0)
    with pytest.raises(InvalidArgumentError):
        parse_stretch("3000,0")
    with pytest.raises(InvalidArgumentError, match="unknown sensor"):
        RasterRead(sensor="worldview").check()


# --------------------------------------------------------------------------- real tiles
@pytest.fixture()
def mosaic(tmp_path: Path, shared_data: Path) -> tuple[Path, dict]:
    tiles = ucm_tiles(shared_data / "ucm16" / "images", 5, 128)
    arch = tmp_path / "arch"
    # 3 × 2 cells of 128 px at 0.3 m, cell 4 (col 1, row 1) nodata, 40 nodata columns at the
    # right: pad chips 4 × 2 = 8, of which the 2 edge chips (31 % valid) and cell 4 are empty
    placed = ucm_mosaic(arch / "mosaic.tif", tiles, 3, 2, empty_cell=4, extra_cols=40)
    return arch, placed


def test_mosaic_chips_equal_tiles_with_footprints(tmp_path: Path, mosaic, tiny_encoder) -> None:
    arch, placed = mosaic
    store = tmp_path / "s"
    rep = index_folder(arch, store, tiny_encoder, num_workers=0, chip_size=128,
                       dtype="float32", progress=False, labels="none")
    assert (rep.scenes, rep.chips, rep.empty_chips, rep.embedded) == (1, 8, 3, 5)
    assert not rep.bad
    st = DirectoryStore.open(store)
    items = st.items.set_index("path")
    assert sorted(items.index) == sorted(
        f"mosaic.tif#window={c * 128},{r * 128},128,128" for c, r in placed)
    to_wgs = pyproj.Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    for (c, r), tile in placed.items():
        path = f"mosaic.tif#window={c * 128},{r * 128},128,128"
        row = items.loc[path]
        got = st.vectors_for_ids([int(row["id"])])
        np.testing.assert_allclose(got, tiny_encoder.encode_images([tile]), atol=1e-5)
        x0, y0 = 500_000 + c * 128 * 0.3, 5_000_000 - r * 128 * 0.3
        x1, y1 = x0 + 38.4, y0 - 38.4
        native = np.asarray(shapely.from_wkb(row["footprint_native"]).exterior.coords)[:4]
        np.testing.assert_allclose(native, [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], atol=1e-6)
        lons, lats = to_wgs.transform([x0, x1, x1, x0], [y0, y0, y1, y1])
        wgs = np.asarray(shapely.from_wkb(row["footprint"]).exterior.coords)[:4]
        np.testing.assert_allclose(wgs, np.c_[lons, lats], atol=1e-9)
        clon, clat = to_wgs.transform((x0 + x1) / 2, (y0 + y1) / 2)
        assert row["lon"] == pytest.approx(clon, abs=1e-9)
        assert row["lat"] == pytest.approx(clat, abs=1e-9)
        assert row["crs"] == "EPSG:32633" and (row["width"], row["height"]) == (128, 128)
        assert row["datetime"] == pd.Timestamp("2021-06-01T10:30:00Z")
        # the thumbnail is the chip, not the scene
        assert np.array_equal(np.asarray(item_image(st, path)), tile)
    assert st.resolve_path(path) == (arch / "mosaic.tif").resolve()
    # a rerun finds the scene finished without opening it
    rep2 = index_folder(arch, store, tiny_encoder, num_workers=0, chip_size=128,
                        dtype="float32", progress=False, labels="none")
    assert (rep2.embedded, rep2.already_indexed, rep2.chips, rep2.scenes) == (0, 8, 0, 0)
    # the same store with another grid is refused
    with pytest.raises(StoreError, match="other settings"):
        index_folder(arch, store, tiny_encoder, num_workers=0, chip_size=64, dtype="float32",
                     progress=False, labels="none")


def test_mosaic_edge_drop_and_no_chips(tmp_path: Path, mosaic, tiny_encoder) -> None:
    arch, _ = mosaic
    rep = index_folder(arch, tmp_path / "d", tiny_encoder, num_workers=2, chip_size=128,
                       edge="drop", progress=False)
    assert (rep.chips, rep.empty_chips, rep.embedded) == (6, 1, 5)
    # without --chip-size: one item for the whole mosaic, with its footprint, as before
    rep = index_folder(arch, tmp_path / "w", tiny_encoder, num_workers=0, progress=False)
    st = DirectoryStore.open(tmp_path / "w")
    assert rep.embedded == 1 and st.items["path"].tolist() == ["mosaic.tif"]
    row = st.items.iloc[0]
    assert shapely.from_wkb(row["footprint_native"]).bounds == pytest.approx(
        (500_000, 5_000_000 - 256 * 0.3, 500_000 + 424 * 0.3, 5_000_000))
    assert (row["width"], row["height"]) == (424, 256)


# --------------------------------------------------------------------------- multispectral
def test_s2_scene_with_preset(tmp_path: Path, tiny_encoder) -> None:
    arch = tmp_path / "arch"
    data = s2_scene(arch / "s2.tif", 260, 170)  # last 30 rows nodata
    store = tmp_path / "s"
    # chips of 100: columns 0, 100, 200 (60 % valid), rows 0 and 100 (40 % valid: empty)
    rep = index_folder(arch, store, tiny_encoder, num_workers=0, chip_size=100,
                       sensor="sentinel2-l2a", progress=False, labels="none")
    assert (rep.chips, rep.empty_chips, rep.embedded) == (6, 3, 3) and not rep.bad
    st = DirectoryStore.open(store)
    assert st.items["datetime"].eq(pd.Timestamp("2022-07-14T10:20:31Z")).all()
    path = "s2.tif#window=0,0,100,100"
    expected = np.clip(data[[3, 2, 1], :100, :100].astype(np.float64) / 3000 * 255, 0,
                       255).astype(np.uint8).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(item_image(st, path)), expected)
    emb = st.vectors_for_ids([int(st.items.set_index("path").loc[path, "id"])])
    np.testing.assert_allclose(emb, tiny_encoder.encode_images([expected]), atol=2e-3)
    # the padded edge chip: 60 valid columns, the rest black
    edge = np.asarray(item_image(st, "s2.tif#window=200,0,100,100"))
    assert edge[:, 60:].max() == 0 and edge[:, :60].min() > 0
    # bands by name from the file's band descriptions: the same composite
    arch2 = tmp_path / "arch2"
    s2_scene(arch2 / "s2.tif", 260, 170, descriptions=True)
    index_folder(arch2, tmp_path / "s2", tiny_encoder, num_workers=0, chip_size=100,
                 bands="B04,B03,B02", stretch="0,3000", progress=False)
    st2 = DirectoryStore.open(tmp_path / "s2")
    assert np.array_equal(np.asarray(item_image(st2, path)), expected)


def test_float_raster_and_bad_band(tmp_path: Path, tiny_encoder) -> None:
    arch = tmp_path / "arch"
    rng = np.random.default_rng(0)
    refl = rng.random((4, 64, 64)).astype(np.float32) * 0.3
    refl[:, :8, :8] = np.nan
    write_geotiff(arch / "f.tif", refl)
    rep = index_folder(arch, tmp_path / "s", tiny_encoder, num_workers=0, bands="3,2,1",
                       stretch="0,0.3", progress=False)
    assert rep.embedded == 1
    st = DirectoryStore.open(tmp_path / "s")
    img = np.asarray(item_image(st, "f.tif"))
    want = np.clip(np.nan_to_num(refl[[2, 1, 0]], nan=0) / 0.3 * 255, 0, 255).astype(np.uint8)
    assert np.array_equal(img, want.transpose(1, 2, 0))
    rep = index_folder(arch, tmp_path / "bad", tiny_encoder, num_workers=0, bands="B04,B03,B02",
                       progress=False)
    assert rep.embedded == 0 and "not found" in rep.bad[0].reason


# --------------------------------------------------------------------------- kill mid-scene
KILL_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from rscir.encoders import load_encoder
from rscir.ingest import index_folder
enc = load_encoder("rscir-tiny", device="cpu")
_encode = enc.encode_preprocessed
def slow_encode(batch):  # a slow model, so the kill lands mid-scene
    time.sleep(0.1)
    return _encode(batch)
enc.encode_preprocessed = slow_encode
index_folder(sys.argv[1], sys.argv[2], enc, num_workers=0, segment_size=8, batch_size=4,
             chip_size=32, progress=False)
"""


def test_kill_during_a_scene_resumes_without_duplicates(tmp_path: Path, tiny_encoder) -> None:
    arch = tmp_path / "arch"
    rng = np.random.default_rng(1)
    write_geotiff(arch / "scene.tif", rng.integers(1, 255, (3, 256, 512)).astype(np.uint8))
    write_geotiff(arch / "b" / "small.tif", rng.integers(1, 255, (3, 32, 32)).astype(np.uint8))
    store = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(arch), str(store)])
    state = store / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and state.read_text().count("seg-") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the indexer finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(DirectoryStore.open(store))
    total = 16 * 8 + 1  # 128 chips of the scene + the small file
    assert 0 < partial < total
    rep = index_folder(arch, store, tiny_encoder, num_workers=0, chip_size=32, progress=False)
    st = DirectoryStore.open(store)
    assert len(st) == total and st.items["path"].is_unique
    assert rep.embedded == total - partial and rep.already_indexed == partial
    assert sorted(st.ids.tolist()) == list(range(total))
    assert "b/small.tif" in set(st.items["path"])  # no larger than a chip: one item as before
    ledger = (store / "artifacts" / "ingest" / "scenes.jsonl").read_text()
    assert '"path": "scene.tif"' in ledger and '"units": 128' in ledger
    rep = index_folder(arch, store, tiny_encoder, num_workers=0, chip_size=32, progress=False)
    assert (rep.embedded, rep.already_indexed, rep.scenes) == (0, total, 0)


# --------------------------------------------------------------------------- Postgres
def test_chips_into_postgres(tmp_path: Path, pg_uri: str, tiny_encoder) -> None:
    from conftest import with_schema

    from rscir.stores import open_store

    arch = tmp_path / "arch"
    s2_scene(arch / "s2.tif", 260, 170)
    uri = with_schema(pg_uri, "chips")
    rep = index_folder(arch, uri, tiny_encoder, num_workers=0, chip_size=100,
                       sensor="sentinel2-l2a", progress=False)
    assert rep.embedded == 3 and rep.empty_chips == 3
    with open_store(uri) as st:
        items = st.items.sort_values("path")
        assert items["path"].tolist() == [f"s2.tif#window={c},0,100,100" for c in (0, 100, 200)]
        assert items["crs"].eq("EPSG:32633").all() and items["footprint"].notna().all()
        assert np.asarray(item_image(st, items["path"].iloc[0])).shape == (100, 100, 3)
    rep = index_folder(arch, uri, tiny_encoder, num_workers=0, chip_size=100,
                       sensor="sentinel2-l2a", progress=False)
    assert rep.embedded == 0 and rep.already_indexed == 6


def test_oversized_scene_names_chip_size(tmp_path: Path, tiny_encoder) -> None:
    arch = tmp_path / "arch"
    rng = np.random.default_rng(2)
    write_geotiff(arch / "big.tif", rng.integers(1, 255, (1, 1100, 1100)).astype(np.uint8))
    rep = index_folder(arch, tmp_path / "s", tiny_encoder, num_workers=0, progress=False,
                       max_pixels=1_000_000)
    assert rep.embedded == 0 and "--chip-size" in rep.bad[0].reason
    # as chips of 512 (the last row and column hold 76 of 512 px: empty) it indexes
    rep = index_folder(arch, tmp_path / "c", tiny_encoder, num_workers=0, progress=False,
                       max_pixels=1_000_000, chip_size=512)
    assert (rep.chips, rep.embedded, rep.empty_chips) == (9, 4, 5) and not rep.bad


def test_datetime_from_file_names_and_tags(tmp_path: Path, tiny_encoder) -> None:
    from rscir.ingest.geo import FilenameTime, tag_datetime

    ft = FilenameTime("%Y%m%dT%H%M%S")
    assert ft.parse("T33UUP/S2A_MSIL2A_20230601T101559_N0509.tif") == "2023-06-01T10:15:59+00:00"
    assert ft.parse("2023/no_time_here.tif") is None
    assert FilenameTime("%Y-%j").parse("site/2021-032/x.tif") == "2021-02-01T00:00:00+00:00"
    assert tag_datetime({"TIFFTAG_DATETIME": "2019:05:04 03:02:01"}) == "2019-05-04T03:02:01+00:00"
    assert tag_datetime({"ACQUISITIONDATETIME": "2020-01-02T03:04:05+02:00",
                         "TIFFTAG_DATETIME": "2019:05:04 03:02:01"}) == "2020-01-02T01:04:05+00:00"
    with pytest.raises(InvalidArgumentError, match="no date field"):
        _ = FilenameTime("scene").regex
    arch = tmp_path / "arch"
    rng = np.random.default_rng(3)
    px = rng.integers(1, 255, (3, 40, 40)).astype(np.uint8)
    write_geotiff(arch / "S2B_20220314T101010_a.tif", px, tags={"TIFFTAG_DATETIME":
                                                                "2023:01:01 00:00:00"})
    write_geotiff(arch / "plain.tif", px, tags={"TIFFTAG_DATETIME": "2023:01:01 00:00:00"})
    index_folder(arch, tmp_path / "s", tiny_encoder, num_workers=0, progress=False,
                 datetime_from="%Y%m%dT%H%M%S")
    got = DirectoryStore.open(tmp_path / "s").items.set_index("path")["datetime"]
    assert got["S2B_20220314T101010_a.tif"] == pd.Timestamp("2022-03-14T10:10:10Z")  # name wins
    assert got["plain.tif"] == pd.Timestamp("2023-01-01T00:00:00Z")  # else the tag
