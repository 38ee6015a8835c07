"""BigEarthNet-S2 v1 and v2 (reBEN) archives in their exact layouts: detection, RGB composite of
band files at 10/20/60 m, 19- and 43-class multi-labels, acquisition dates, footprints,
thumbnails, and multi-label retrieval on the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from geo_fixtures import bigearthnet_v1, bigearthnet_v2

from rscir.bench.rsir import multi_label_retrieval
from rscir.errors import InvalidArgumentError
from rscir.ingest import index_folder
from rscir.ingest.bigearthnet import CLASSES_19, detect, to_19
from rscir.ingest.render import item_image
from rscir.stores import DirectoryStore

shapely = pytest.importorskip("shapely")


def rgb_of(bands: dict[str, np.ndarray]) -> np.ndarray:
    """The sentinel2-l2a composite by hand: B04, B03, B02, DN 0..3000 -> 0..255 (truncated)."""
    x = np.stack([bands["B04"], bands["B03"], bands["B02"]], axis=-1).astype(np.float64)
    return np.clip(x / 3000 * 255, 0, 255).astype(np.uint8)


def test_label_mapping() -> None:
    assert to_19(["Non-irrigated arable land", "Pastures", "Sea and ocean"]) == [
        "Arable land", "Marine waters", "Pastures"]
    # urban classes other than fabric/industrial and bare rock have no 19-class counterpart
    assert to_19(["Airports", "Bare rock", "Discontinuous urban fabric"]) == ["Urban fabric"]
    assert to_19(["Natural grassland", "Sparsely vegetated areas"]) == [
        "Natural grassland and sparsely vegetated areas"]
    assert len(CLASSES_19) == 19


def test_v1(tmp_path: Path, tiny_encoder) -> None:
    root = tmp_path / "BigEarthNet-v1.0"
    patches = bigearthnet_v1(root)
    assert detect(root) == 1
    (root / "README.txt").write_text("not a patch")
    rep = index_folder(root, tmp_path / "s", tiny_encoder, num_workers=0, progress=False,
                       dtype="float32")
    assert rep.archive == "bigearthnet-v1" and rep.embedded == 4 and not rep.bad
    st = DirectoryStore.open(tmp_path / "s")
    items = st.items.set_index("path")
    assert sorted(items.index) == sorted(patches)
    for name, p in patches.items():
        row = items.loc[name]
        assert sorted(row["labels"]) == to_19(p["labels"]) and row["label"] is None
        date = name.split("_")[2]
        assert row["datetime"] == pd.Timestamp(f"{date[:4]}-{date[4:6]}-{date[6:8]} 10:10:31Z")
        assert shapely.from_wkb(row["footprint_native"]).bounds == pytest.approx(
            (p["origin"][0], p["origin"][1] - 1200, p["origin"][0] + 1200, p["origin"][1]))
        assert row["crs"] == "EPSG:32633" and (row["width"], row["height"]) == (120, 120)
        rgb = rgb_of(p["bands"])
        assert np.array_equal(np.asarray(item_image(st, name)), rgb)
        emb = st.vectors_for_ids([int(row["id"])])
        np.testing.assert_allclose(emb, tiny_encoder.encode_images([rgb]), atol=1e-5)
    # the 43-class labels, and a false-colour composite whose 20 m band is resampled to 10 m
    rep = index_folder(root, tmp_path / "s43", tiny_encoder, num_workers=0, progress=False,
                       bigearthnet_labels=43, bands="B8A,B04,B03")
    st43 = DirectoryStore.open(tmp_path / "s43")
    name = next(iter(patches))
    assert sorted(st43.items.set_index("path").loc[name, "labels"]) == sorted(
        patches[name]["labels"])
    img = np.asarray(item_image(st43, name))
    assert img.shape == (120, 120, 3)
    assert np.array_equal(img[..., 1], rgb_of(patches[name]["bands"])[..., 0])  # B04 as is


def test_v2_and_multilabel_retrieval(tmp_path: Path, tiny_encoder) -> None:
    root = tmp_path / "reBEN"
    patches = bigearthnet_v2(root)
    assert detect(root) == 2
    rep = index_folder(root, tmp_path / "s", tiny_encoder, num_workers=2, progress=False)
    assert rep.archive == "bigearthnet-v2" and rep.embedded == 4 and not rep.bad
    st = DirectoryStore.open(tmp_path / "s")
    items = st.items
    for path, labels, when in zip(items["path"], items["labels"], items["datetime"],
                                  strict=True):
        name = Path(path).name
        assert path == "BigEarthNet-S2/" + "_".join(name.split("_")[:-2]) + "/" + name
        assert sorted(labels) == patches[name]["labels"]
        assert when == pd.Timestamp("2017-06-13T10:10:31Z" if "20170613" in name else
                                    "2018-02-04T00:00:00Z")  # v1 names may garble the time
        assert np.array_equal(np.asarray(item_image(st, path)), rgb_of(patches[name]["bands"]))
    # rscir's multi-label retrieval on the store's own labels
    names = sorted({x for ls in items["labels"] for x in ls})
    lm = np.array([[n in ls for n in names] for ls in items["labels"]], np.float32)
    pq = multi_label_retrieval(np.asarray(st.embeddings, np.float32), lm, ks=(1, 3))
    assert len(pq["query"]) == 4 and np.isfinite(pq["AP"]).all()
    with pytest.raises(InvalidArgumentError, match="19 classes"):
        index_folder(root, tmp_path / "x", tiny_encoder, num_workers=0, progress=False,
                     bigearthnet_labels=43)
    # a patch listed in the metadata whose files are gone is reported, the rest resumes
    gone = next(p for p in items["path"] if p.endswith("_3_5"))
    for f in (root / gone).iterdir():
        f.unlink()
    rep = index_folder(root, tmp_path / "s", tiny_encoder, num_workers=0, progress=False)
    assert rep.embedded == 0 and [b.path for b in rep.ignored] == [gone]
