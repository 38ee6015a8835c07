"""The hand-crafted descriptor and the classic encoder (no weights, images only)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data_dir
from PIL import Image

from rscir.encoders import default_registry, load_encoder
from rscir.encoders.classic import ClassicEncoder, NoTextTowerError
from rscir.features import HandcraftedDescriptor, describe, to_working_array


def _shared_data() -> Path | None:
    p = shared_data_dir()
    return p if p.is_dir() else None


def _stripes(n: int, period: int, vertical: bool, color: tuple[int, int, int]) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n]
    t = (xx if vertical else yy) // period % 2
    img = np.zeros((n, n, 3), np.uint8)
    img[t == 1] = color
    return img


def test_layout_and_dtype() -> None:
    d = HandcraftedDescriptor()
    dims = d.block_dims()
    # 8*3*3 HSV bins; 3 moments x 6 channels; LBP P+2 bins per scale; Gabor 2*F*O + 2*F
    assert dims == {"hsv_hist": 72, "color_mom": 18, "lbp": 10 + 18, "gabor": 2 * 24 + 8}
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(64, 80), (300, 257)]]
    x = describe(imgs)
    assert x.shape == (2, d.dim) and x.dtype == np.float32 and np.isfinite(x).all()


def test_deterministic_and_size_independent() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    a = describe([img, Image.fromarray(img)])
    assert np.array_equal(a[0], a[1])  # array and PIL give the same descriptor
    assert np.array_equal(describe([img]), describe([img]))
    # grey images as HxW, HxWx1 and float [0,1] are accepted and agree
    g = rng.integers(0, 256, (50, 60), dtype=np.uint8)
    b = describe([g, g[..., None], g.astype(np.float32) / 255.0])
    np.testing.assert_allclose(b[0], b[1])
    np.testing.assert_allclose(b[0], b[2], atol=1e-6)


def test_hand_computed_colour_blocks() -> None:
    """A uniform pure-red image: one HSV bin holds all mass; moments are exact."""
    d = HandcraftedDescriptor()
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 0] = 255
    x = describe([red])[0]
    hist = x[:72]
    # hue 0 -> bin 0, saturation 1 -> bin 2, value 1 -> bin 2: code (0*3+2)*3+2 = 8
    assert hist[8] == pytest.approx(1.0) and np.count_nonzero(hist) == 1
    mom = x[72:90] * np.sqrt(6.0)  # undo the block scale
    # means of R,G,B,H,S,V = 1,0,0,0,1,1; std and skew are 0 for a constant image
    np.testing.assert_allclose(mom[:6], [1, 0, 0, 0, 1, 1], atol=1e-6)
    np.testing.assert_allclose(mom[6:], 0, atol=1e-6)
    # a flat image has no texture: all Gabor energies vanish
    assert np.abs(x[-d.block_dims()["gabor"] :]).max() < 1e-6


def test_rotation_invariance_and_texture_discrimination() -> None:
    """Rotating stripes by 90° barely moves the descriptor; changing their period does."""
    h = describe([_stripes(128, 4, False, (200, 180, 40))])[0]
    v = describe([_stripes(128, 4, True, (200, 180, 40))])[0]
    coarse = describe([_stripes(128, 16, False, (200, 180, 40))])[0]
    assert np.linalg.norm(h - v) < 0.25 * np.linalg.norm(h - coarse)


def test_working_array_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="image array"):
        to_working_array(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="uint8 batch"):
        HandcraftedDescriptor().from_arrays(np.zeros((1, 10, 10, 3), np.uint8))


def test_classic_encoder_interface() -> None:
    enc = load_encoder("classic")
    assert isinstance(enc, ClassicEncoder)
    assert enc.info.backend == "classic" and enc.info.dim == HandcraftedDescriptor().dim
    assert "classic" in default_registry().names()
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 256, (70 + i, 90, 3), dtype=np.uint8) for i in range(5)]
    e = enc.encode_images(imgs)
    assert e.shape == (5, enc.dim) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    # the DataLoader path (picklable preprocess -> collate -> encode_preprocessed) agrees
    pre = pickle.loads(pickle.dumps(enc.preprocess))
    batch = enc.collate([pre(Image.fromarray(im)) for im in imgs])
    np.testing.assert_allclose(enc.encode_preprocessed(batch), e, atol=1e-6)
    assert enc.encode_images([]).shape == (0, enc.dim)
    # same config + stats -> same fingerprint (a store can check it)
    assert ClassicEncoder().info.same_space(enc.info)


def test_classic_encoder_has_no_text_tower() -> None:
    enc = ClassicEncoder()
    with pytest.raises(NoTextTowerError, match="no text tower"):
        enc.encode_texts(["a river"])
    assert isinstance(NoTextTowerError("x"), RuntimeError)  # the CLI prints it and exits 2


def test_custom_stats_change_fingerprint(tmp_path: Path) -> None:
    d = HandcraftedDescriptor().dim
    f = tmp_path / "stats.npz"
    np.savez(f, mean=np.zeros(d), std=np.ones(d))
    enc = load_encoder("classic", checkpoint=str(f))
    assert not enc.info.same_space(ClassicEncoder().info)
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(3), std=np.ones(3))
    with pytest.raises(RuntimeError, match="expected"):
        ClassicEncoder(stats=bad)


@pytest.mark.realdata
def test_classic_retrieves_same_class_on_ucm() -> None:
    """On real UCM tiles, same-class neighbours beat chance by a wide margin (P@5)."""
    data = _shared_data()
    if data is None or not (data / "ucm16" / "images").is_dir():
        pytest.skip("../shared/data/ucm16 is not available (set RSCIR_SHARED_DATA)")
    classes = sorted(p.name for p in (data / "ucm16" / "images").iterdir())[:6]
    paths, labels = [], []
    for c in classes:
        for p in sorted((data / "ucm16" / "images" / c).glob("*.jpg"))[:12]:
            paths.append(p)
            labels.append(c)
    enc = ClassicEncoder()
    e = enc.encode_images([Image.open(p) for p in paths])
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    nn = np.argsort(-s, axis=1)[:, :5]
    y = np.array(labels)
    p5 = (y[nn] == y[:, None]).mean()
    chance = 11 / (len(y) - 1)
    assert p5 > 2 * chance
