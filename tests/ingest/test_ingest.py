"""Ingestion: decoding formats, bad files, labels, resume (also after kill -9), real images."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rscir.ingest import ImageDecodeError, index_folder, load_image, read_label_csv
from rscir.stores import DirectoryStore


def seed_bad_files(folder: Path) -> dict[str, str]:
    bad = folder / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    good = folder / "beach" / "beach01.jpg"
    data = good.read_bytes() if good.exists() else b""
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notanimage.png").write_text("hello, I am text")
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(1).bytes(300))
    buf = Path(folder / "bad" / "big.png")
    Image.new("L", (3000, 3000)).save(buf)  # 9 Mpx: a "bomb" under a 1 Mpx cap
    src = folder / "bad" / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src)
    raw = src.read_bytes()
    src.unlink()
    (bad / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (folder / "README.txt").write_text("not an image type")
    del data
    return {
        "bad/empty.jpg": "empty",
        "bad/notanimage.png": "not an image",
        "bad/corrupt.jpg": "corrupt",
        "bad/big.png": "oversized",
        "bad/truncated.jpg": "truncated",
    }


def test_load_image_errors(tmp_path: Path, image_folder: Path) -> None:
    expected = seed_bad_files(image_folder)
    for rel, reason in expected.items():
        with pytest.raises(ImageDecodeError, match=reason):
            load_image(image_folder / rel, max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match="cannot read"):
        load_image(tmp_path / "missing.jpg")
    im, meta = load_image(next((image_folder / "beach").glob("*.jpg")))
    assert im.mode == "RGB" and meta.width == 48


def test_index_reports_bad_files_and_resumes(tmp_path: Path, image_folder: Path, tiny_encoder) -> None:
    expected = seed_bad_files(image_folder)
    store_dir = tmp_path / "store"
    rep = index_folder(image_folder, store_dir, tiny_encoder, num_workers=2, segment_size=4,
                       max_pixels=1_000_000, progress=False)
    assert rep.embedded == 16 and len(rep.bad) == len(expected)
    assert {b.path for b in rep.bad} == set(expected)
    assert [i.path for i in rep.ignored] == ["README.txt"]
    assert (store_dir / "reports" / "bad_files.csv").read_text().count("\n") == len(expected) + 1
    st = DirectoryStore.open(store_dir)
    assert len(st) == 16 and st.items["path"].is_unique
    assert set(st.items["label"]) == {"beach", "forest", "harbor"}
    emb_before = np.array(st.embeddings, np.float32)
    # resume: nothing new
    rep2 = index_folder(image_folder, store_dir, tiny_encoder, num_workers=0, progress=False,
                        max_pixels=1_000_000)
    assert rep2.embedded == 0 and rep2.already_indexed == 16 + len(expected) - len(rep2.bad)
    # a new file and a changed file are (re)embedded; ids stay stable
    Image.new("RGB", (40, 40), (10, 200, 10)).save(image_folder / "forest" / "new.jpg")
    changed = image_folder / "beach" / "beach01.jpg"
    Image.new("RGB", (40, 40), (250, 250, 0)).save(changed)
    old_id = int(st.items.set_index("path").loc["beach/beach01.jpg", "id"])
    rep3 = index_folder(image_folder, store_dir, tiny_encoder, num_workers=0, progress=False,
                        max_pixels=1_000_000)
    assert rep3.embedded == 2
    st3 = DirectoryStore.open(store_dir)
    assert len(st3) == 17 and st3.items["path"].is_unique
    assert int(st3.items.set_index("path").loc["beach/beach01.jpg", "id"]) == old_id
    row = st3.rows_for_paths(["forest/forest00.png"])[0]
    row0 = st.rows_for_paths(["forest/forest00.png"])[0]
    np.testing.assert_array_equal(np.asarray(st3.embeddings[row]), emb_before[row0])


def test_embeddings_match_direct_encoding(tmp_path: Path, image_folder: Path, tiny_encoder) -> None:
    index_folder(image_folder, tmp_path / "s", tiny_encoder, num_workers=2, progress=False,
                 dtype="float32")
    st = DirectoryStore.open(tmp_path / "s")
    paths = st.items["path"].tolist()[:5]
    direct = tiny_encoder.encode_images([Image.open(image_folder / p) for p in paths])
    np.testing.assert_allclose(np.asarray(st.embeddings[:5]), direct, atol=1e-5)


def test_geotiff_footprint_centre(tmp_path: Path, tiny_encoder) -> None:
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    d = tmp_path / "geo"
    d.mkdir()
    data = (np.random.default_rng(0).random((4, 32, 32)) * 4000).astype(np.uint16)
    # UTM zone 33N, 10 m pixels; centre at easting 500160, northing 5000000-160
    with rasterio.open(d / "tile.tif", "w", driver="GTiff", width=32, height=32, count=4,
                       dtype="uint16", crs="EPSG:32633",
                       transform=from_origin(500000, 5000000, 10, 10)) as ds:
        ds.write(data)
    im, meta = load_image(d / "tile.tif")
    assert im.size == (32, 32) and im.mode == "RGB"
    assert meta.lon == pytest.approx(15.002, abs=2e-3)  # zone 33 central meridian is 15°E
    # meridian-arc series by hand: northing 4,999,840 m / k0 0.9996 -> latitude 45.1520°
    assert meta.lat == pytest.approx(45.1520, abs=2e-3)
    index_folder(d, tmp_path / "s", tiny_encoder, num_workers=0, progress=False, labels="none")
    st = DirectoryStore.open(tmp_path / "s")
    assert st.items["lon"].iloc[0] == pytest.approx(meta.lon)
    assert st.items["label"].iloc[0] is None


def test_label_csv(tmp_path: Path) -> None:
    p = tmp_path / "l.csv"
    p.write_text("image,cars,trees,water\na/1.jpg,1,0,1\na/2.jpg,0,0,0\n")
    m = read_label_csv(p)
    assert m["a/1.jpg"] == (None, ["cars", "water"]) and m["a/2.jpg"] == (None, [])
    p.write_text("path,label\nx.jpg,beach\n")
    assert read_label_csv(p)["x.jpg"] == ("beach", ["beach"])
    p.write_text("path,a\nx.jpg,3\n")
    with pytest.raises(ValueError, match="0/1"):
        read_label_csv(p)


KILL_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from rscir.encoders import load_encoder
from rscir.ingest import index_folder
import time
enc = load_encoder("rscir-tiny", device="cpu")
_encode = enc.encode_preprocessed
def slow_encode(batch):  # a slow model, so the kill lands mid-run
    time.sleep(0.1)
    return _encode(batch)
enc.encode_preprocessed = slow_encode
index_folder(sys.argv[1], sys.argv[2], enc, num_workers=0, segment_size=8, batch_size=4,
             progress=False)
"""


def test_resume_after_kill_9(tmp_path: Path, tiny_encoder) -> None:
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "a", {"c1": 40, "c2": 40, "c3": 40})
    store_dir = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(folder), str(store_dir)])
    deadline = time.time() + 120
    state = store_dir / "state.json"
    # wait until at least two segments are committed, then kill -9 mid-run
    while time.time() < deadline:
        if state.exists() and state.read_text().count("seg-") >= 2:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "indexer finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(DirectoryStore.open(store_dir))
    assert 0 < partial < 120
    rep = index_folder(folder, store_dir, tiny_encoder, num_workers=0, progress=False)
    st = DirectoryStore.open(store_dir)
    assert len(st) == 120 and st.items["path"].is_unique
    assert rep.embedded == 120 - partial
    assert sorted(st.ids.tolist()) == list(range(120))


@pytest.mark.realdata
def test_index_real_archives(tmp_path: Path, shared_data: Path, tiny_encoder) -> None:
    for name, n, n_cls in (("ucm16", 1600, 16), ("rsscn7", 2800, 7)):
        rep = index_folder(shared_data / name / "images", tmp_path / name, tiny_encoder,
                           num_workers=2, progress=False, batch_size=128)
        assert rep.embedded == n and not rep.bad, rep.bad[:3]
        st = DirectoryStore.open(tmp_path / name)
        assert len(st) == n and st.items["label"].nunique() == n_cls
        assert (st.items["width"] > 200).all()
        assert np.isfinite(np.asarray(st.embeddings, np.float32)).all()
    tifs = sorted((shared_data / "ucm16" / "tif-samples").glob("*.tif"))
    if tifs:
        im, meta = load_image(tifs[0])
        assert im.mode == "RGB" and meta.width > 200
