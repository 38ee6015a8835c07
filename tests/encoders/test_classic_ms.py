"""classic-ms: the all-band hand-crafted descriptor. Dimensions by band count, statistics of
masked pixels by hand, NIR that RGB cannot see, RGB inputs of every kind, identity per band
count, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rscir.encoders import load_encoder
from rscir.encoders.base import BandLayout
from rscir.encoders.classic import ClassicMSEncoder, NoTextTowerError
from rscir.errors import ImageDecodeError, InvalidArgumentError
from rscir.features import HandcraftedDescriptor, MultispectralDescriptor
from rscir.features.handcrafted import to_working_array


def test_dimensions() -> None:
    # C·(3 stats + 8 bins) + images · (LBP 10 + 18, Gabor 2·4·6 + 2·4)
    assert MultispectralDescriptor(3).dim == 3 * 11 + 2 * 84 == 201
    assert MultispectralDescriptor(12).dim == 12 * 11 + 2 * 84 == 300
    assert MultispectralDescriptor(12, red=3, nir=7).dim == 12 * 11 + 3 * 84 == 384
    assert MultispectralDescriptor(1).dim == 11 + 168
    d = MultispectralDescriptor(4, red=0, nir=3)
    assert d(np.random.default_rng(0).random((2, 4, 40, 50))).shape == (2, d.dim)
    with pytest.raises(InvalidArgumentError, match="both"):
        MultispectralDescriptor(4, red=0)
    with pytest.raises(InvalidArgumentError, match="outside"):
        MultispectralDescriptor(4, red=0, nir=4)


def test_masked_pixels_carry_no_weight() -> None:
    """A constant valid half (ρ = 0.09 in every band) and a NaN half: mean 0.09, std 0, all
    histogram mass in the √ρ bin 0.3·8 → 2, whatever the masked pixels are."""
    c = 4
    x = np.full((c, 64, 64), 0.09, np.float32)
    x[:, :, 32:] = np.nan
    d = MultispectralDescriptor(c)
    v = d([x])[0].astype(np.float64) * np.sqrt(c)  # undo the block's 1/√C
    mean, std, skew = v[:c], v[c:2 * c], v[2 * c:3 * c]
    np.testing.assert_allclose(mean, 0.09, atol=1e-6)
    np.testing.assert_allclose(std, 0.0, atol=1e-6)
    np.testing.assert_allclose(skew, 0.0, atol=1e-4)
    hist = v[3 * c:3 * c + 8 * c].reshape(c, 8)
    assert np.allclose(hist[:, 2], 1.0) and np.allclose(np.delete(hist, 2, axis=1), 0.0)
    # a pixel NaN in one band is masked in all: its other bands' values change nothing
    y = x.copy()
    y[0, :, 32:] = 0.7
    assert np.array_equal(d([y]), d([x]))


def test_nir_difference_invisible_to_rgb_visible_to_ms() -> None:
    rng = np.random.default_rng(1)
    a = rng.uniform(0.02, 0.25, (12, 48, 48)).astype(np.float32)
    b = a.copy()
    b[7] = rng.uniform(0.3, 0.5, (48, 48))  # only B08 (NIR) differs
    rgb = [np.round(np.clip(z[[3, 2, 1]].transpose(1, 2, 0) / 0.3, 0, 1) * 255).astype(np.uint8)
           for z in (a, b)]
    classic = HandcraftedDescriptor()(rgb)
    assert np.array_equal(classic[0], classic[1])
    enc = ClassicMSEncoder().for_bands(BandLayout(12, red=3, nir=7))
    e = enc.encode_images([a, b])
    assert e.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    assert float(e[0] @ e[1]) < 0.99


def test_rgb_inputs_and_identity() -> None:
    enc = load_encoder("classic-ms")
    assert isinstance(enc, ClassicMSEncoder) and enc.wants_bands == "all"
    assert enc.dim == 201 and enc.info.preprocessing["band_count"] == 3
    rgb = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    pil = Image.fromarray(rgb)
    f = rgb.transpose(2, 0, 1).astype(np.float32) / 255
    e = enc.encode_images([pil, rgb, f])
    assert np.array_equal(e[0], e[1]) and np.array_equal(e[0], e[2])
    assert np.array_equal(enc.preprocess(pil), enc.preprocess(f))
    np.testing.assert_allclose(enc.encode_preprocessed(enc.collate([enc.preprocess(pil)])),
                               e[:1], atol=1e-7)
    # the band count is part of the identity; the same layout is the same model
    e12 = enc.for_bands(BandLayout(12, 3, 7))
    assert e12.dim == 384 and e12.info.preprocessing["band_count"] == 12
    assert not e12.info.same_space(enc.info)
    assert e12.for_bands(BandLayout(12, 3, 7)) is e12
    assert enc.for_bands(BandLayout(3)) is enc
    assert not load_encoder("classic").info.same_space(enc.info)
    with pytest.raises(ImageDecodeError, match="12 bands.*another store"):
        e12.encode_images([pil])
    with pytest.raises(NoTextTowerError):
        enc.encode_texts(["a beach"])
    e12.warm_up()


def test_classic_unchanged_by_the_shared_texture_blocks() -> None:
    """The texture blocks classic-ms reuses are exactly classic's LBP and Gabor blocks."""
    rgb = np.random.default_rng(3).integers(0, 256, (2, 90, 90, 3), dtype=np.uint8)
    d = HandcraftedDescriptor()
    arr = np.stack([to_working_array(x, d.size) for x in rgb])
    full = d.from_arrays(arr)
    dims = d.block_dims()
    lo = dims["hsv_hist"] + dims["color_mom"]
    grey01 = arr.astype(np.float64) / 255 @ np.array([0.2125, 0.7154, 0.0721])
    tex = d.texture(np.round(grey01 * 255).astype(np.uint8), grey01)
    np.testing.assert_allclose(full[:, lo:], tex.astype(np.float32), atol=1e-6)
