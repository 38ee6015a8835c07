"""All-band ingestion for classic-ms: every band of a raster (as reflectance) instead of the RGB
composite, on the local path and on the Ray CPU path's decoders; BigEarthNet patches with all
12 bands on the 10 m grid; RGB tiles as 3 bands; one band count per store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder
from geo_fixtures import bigearthnet_v1, write_geotiff
from PIL import Image

from rscir.api import load_encoder_for_store
from rscir.bench.rsir import multi_label_retrieval
from rscir.encoders import load_encoder
from rscir.encoders.base import BandLayout
from rscir.errors import InvalidArgumentError, ModelMismatchError
from rscir.ingest import index_folder
from rscir.ingest.render import item_image
from rscir.ingest.sensors import RasterRead
from rscir.stores import DirectoryStore

pytest.importorskip("rasterio")


def rgb_of(bands: dict[str, np.ndarray]) -> np.ndarray:
    x = np.stack([bands["B04"], bands["B03"], bands["B02"]], axis=-1).astype(np.float64)
    return np.clip(x / 3000 * 255, 0, 255).astype(np.uint8)


def nir_scene(path: Path) -> np.ndarray:
    """A 12-band uint16 S2 L2A scene, 64 × 128: two 64 px chips equal in every band but B08."""
    rng = np.random.default_rng(5)
    left = rng.integers(200, 2500, (12, 64, 64)).astype(np.uint16)
    data = np.concatenate([left, left], axis=2)
    data[7, :, 64:] = rng.integers(3000, 5000, (64, 64))  # B08 (NIR) of the right chip only
    write_geotiff(path, data, nodata=0)
    return data


def embeddings_by_path(store: Path) -> dict[str, np.ndarray]:
    st = DirectoryStore.open(store)
    emb = np.asarray(st.embeddings, np.float32)
    return {p: emb[i] for i, p in enumerate(st.items["path"])}


def test_nir_chips_equal_in_rgb_differ_in_all_bands(tmp_path: Path) -> None:
    nir_scene(tmp_path / "a" / "scene.tif")
    opts = {"num_workers": 0, "progress": False, "dtype": "float32", "chip_size": 64,
            "sensor": "sentinel2-l2a"}
    index_folder(tmp_path / "a", tmp_path / "rgb", load_encoder("classic"), **opts)
    rgb = list(embeddings_by_path(tmp_path / "rgb").values())
    assert len(rgb) == 2 and np.array_equal(rgb[0], rgb[1])
    rep = index_folder(tmp_path / "a", tmp_path / "ms", load_encoder("classic-ms"), **opts)
    assert rep.embedded == 2 and not rep.bad
    st = DirectoryStore.open(tmp_path / "ms")
    # 12 bands of the sentinel2-l2a stack: red B04 and NIR B08 known, so NDVI texture too
    assert st.manifest.model.dim == 12 * 11 + 3 * 84 == 384
    assert st.manifest.model.preprocessing["layout"] == {"count": 12, "red": 3, "nir": 7}
    ms = list(embeddings_by_path(tmp_path / "ms").values())
    assert float(ms[0] @ ms[1]) < 0.99
    # the store's encoder comes back set up for its 12 bands (searching needs no flags)
    enc = load_encoder_for_store(st)
    assert enc.dim == 384
    # without a sensor (and no band names) there is no NDVI: 12·11 + 2·84
    index_folder(tmp_path / "a", tmp_path / "ms2", load_encoder("classic-ms"),
                 **{**opts, "sensor": None})
    assert DirectoryStore.open(tmp_path / "ms2").manifest.model.dim == 300
    with pytest.raises(InvalidArgumentError, match="every band.*drop --bands"):
        index_folder(tmp_path / "a", tmp_path / "x", load_encoder("classic-ms"),
                     **{**opts, "bands": "4,3,2"})


def test_reflectance_by_hand() -> None:
    raw = np.array([[[0, 1500]], [[3000, 12000]]], np.uint16)  # (2, 1, 2)
    valid = np.array([[False, True]])
    out = RasterRead(sensor="sentinel2-l2a").to_reflectance(raw, valid)
    assert out.dtype == np.float32 and np.isnan(out[:, 0, 0]).all()
    np.testing.assert_allclose(out[:, 0, 1], [0.15, 1.0])  # ρ = DN / 10000, clipped to 1
    fixed = RasterRead(stretch=("fixed", 0.0, 6000.0)).to_reflectance(raw)
    np.testing.assert_allclose(fixed[:, 0, :], [[0.0, 0.25], [0.5, 1.0]])
    u8 = RasterRead().to_reflectance(np.array([[[0, 51, 255]]], np.uint8))
    np.testing.assert_allclose(u8[0, 0], [0.0, 0.2, 1.0])


def test_bigearthnet_all_bands_and_multilabel_retrieval(tmp_path: Path) -> None:
    root = tmp_path / "BigEarthNet-v1.0"
    patches = bigearthnet_v1(root)
    enc = load_encoder("classic-ms")
    rep = index_folder(root, tmp_path / "s", enc, num_workers=0, progress=False,
                       dtype="float32")
    assert rep.archive == "bigearthnet-v1" and rep.embedded == 4 and not rep.bad
    st = DirectoryStore.open(tmp_path / "s")
    assert st.manifest.model.name == "classic-ms" and st.manifest.model.dim == 384
    items = st.items
    emb = np.asarray(st.embeddings, np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # every band file, 20/60 m ones on the 10 m grid: the patch item is 120 × 120
    assert (items["width"] == 120).all() and (items["height"] == 120).all()
    # B01 (60 m) is part of the descriptor: a changed B01 changes the embedding
    name = sorted(patches)[0]
    b01 = root / name / f"{name}_B01.tif"
    write_geotiff(b01, np.full((1, 20, 20), 2800, np.uint16),
                  origin=patches[name]["origin"], res=60.0, tiled=False)
    index_folder(root, tmp_path / "s2", enc, num_workers=0, progress=False, dtype="float32")
    other = embeddings_by_path(tmp_path / "s2")
    mine = embeddings_by_path(tmp_path / "s")
    assert not np.allclose(other[name], mine[name], atol=1e-4)
    assert all(np.allclose(other[p], mine[p], atol=1e-6) for p in mine if p != name)
    # thumbnails stay the RGB composite
    p2 = sorted(patches)[1]
    assert np.array_equal(np.asarray(item_image(st, p2)), rgb_of(patches[p2]["bands"]))
    # multi-label retrieval (as `rscir bench rsir` runs it) on the store's own labels
    names = sorted({x for ls in items["labels"] for x in ls})
    lm = np.array([[n in ls for n in names] for ls in items["labels"]], np.float32)
    pq = multi_label_retrieval(emb, lm, ks=(1, 3))
    assert len(pq["query"]) == 4 and np.isfinite(pq["AP"]).all()
    # a hashing estimator trains on the all-band embeddings as on any others
    from rscir.hashing import make_hasher

    codes = make_hasher("lsh", 16).fit(emb).transform(emb)
    assert codes.shape == (4, 2) and codes.dtype == np.uint8
    # one band count per store: RGB tiles into the 12-band store are refused, naming the fix
    tiles = make_image_folder(tmp_path / "tiles", {"beach": 2})
    with pytest.raises(ModelMismatchError, match="12-band.*3 bands.*new store"):
        index_folder(tiles, tmp_path / "s", load_encoder("classic-ms"), num_workers=0,
                     progress=False)


def test_rgb_tiles(tmp_path: Path) -> None:
    tiles = make_image_folder(tmp_path / "tiles", {"beach": 3, "forest": 2})
    enc = load_encoder("classic-ms")
    rep = index_folder(tiles, tmp_path / "s", enc, num_workers=2, progress=False,
                       dtype="float32")
    assert rep.embedded == 5 and not rep.bad
    st = DirectoryStore.open(tmp_path / "s")
    assert st.manifest.model.dim == 201
    for path, e in embeddings_by_path(tmp_path / "s").items():
        want = enc.encode_images([Image.open(tiles / path)])[0]
        np.testing.assert_allclose(e, want, atol=1e-6)
    # a multispectral GeoTIFF among the tiles has another band count: that file alone fails
    write_geotiff(tiles / "forest" / "ms.tif", np.full((5, 48, 48), 100, np.uint16))
    rep = index_folder(tiles, tmp_path / "s", enc, num_workers=0, progress=False,
                       dtype="float32")
    assert rep.embedded == 0 and [b.path for b in rep.bad] == ["forest/ms.tif"]
    assert "5 bands" in rep.bad[0].reason or "shape (5," in rep.bad[0].reason


def test_ray_cpu_path_decodes_all_bands(tmp_path: Path) -> None:
    """The Ray driver's pieces without a cluster: the spec says "all" before anything is
    built, the bound spec builds the 12-band model, and a CPU encoder actor's decode + embed
    of the units equals the local store."""
    from rscir.ingest.discover import band_layout, discover
    from rscir.ingest.ray_data import EncoderSpec, RayDriver, UnitEncoder, _probe, _unit_columns
    from rscir.ingest.units import WorkPlan

    root = tmp_path / "BigEarthNet-v1.0"
    bigearthnet_v1(root)
    driver = RayDriver(EncoderSpec("classic-ms"))
    assert driver.band_request() == "all"
    assert RayDriver(EncoderSpec("classic")).band_request() == "rgb"
    arch = discover(root, "auto", RasterRead(), all_bands=True)
    layout = band_layout(arch, 10**8)
    assert layout == BandLayout(12, 3, 7)
    driver.bind_bands(layout)
    probe = _probe(driver.spec)
    assert probe.info.dim == 384 and probe.shape == (384,)
    actor = UnitEncoder(driver.spec, "cpu", 1)
    plan = WorkPlan.whole(arch.complete(arch.sources) if arch.complete else arch.sources)
    cols = actor.embed(_unit_columns(plan), str(root), arch.read, 10**8)
    assert (cols["error"] == "").all()
    index_folder(root, tmp_path / "s", load_encoder("classic-ms"), num_workers=0,
                 progress=False, dtype="float32")
    local = embeddings_by_path(tmp_path / "s")
    for i in range(len(plan)):
        np.testing.assert_allclose(cols["emb"][i], local[plan.path(i)], atol=1e-6)


def test_outside_query_file_read_with_all_bands(tmp_path: Path) -> None:
    """A 12-band file outside the archive, queried on a classic-ms store, is read as the
    store's items were (every band, the store's sensor scaling): its query vector equals the
    stored embedding of the same pixels, and its NIR twin is not the top hit."""
    from rscir.search import Searcher

    data = nir_scene(tmp_path / "a" / "scene.tif")
    opts = {"num_workers": 0, "progress": False, "dtype": "float32", "chip_size": 64,
            "sensor": "sentinel2-l2a"}
    index_folder(tmp_path / "a", tmp_path / "ms", load_encoder("classic-ms"), **opts)
    st = DirectoryStore.open(tmp_path / "ms")
    right = write_geotiff(tmp_path / "q" / "right.tif", data[:, :, 64:], nodata=0)
    s = Searcher(st, load_encoder_for_store(st))
    vec, iid = s.image_vector(right)
    assert iid is None  # not an archive file: encoded, not looked up
    emb = embeddings_by_path(tmp_path / "ms")
    want = next(v for p, v in emb.items() if "window=64," in p)
    np.testing.assert_allclose(vec, want, atol=1e-5)
    rows, _ = s.search_vectors(vec[None], None, "image", 0.0, 2)
    top = st.items_for_ids(rows[0][:1])["path"].iloc[0]
    assert "window=64," in top
