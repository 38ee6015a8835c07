"""A hand-crafted descriptor of every band of a multispectral item (C bands, any C ≥ 1).

The RGB descriptor (:mod:`.handcrafted`) sees a 3-band composite; BigEarthNet-style retrieval
with hand-crafted features (Demir & Bruzzone) describes all 12 Sentinel-2 bands, because
red-edge, NIR and SWIR separate classes that look alike in RGB (crops, forests, wetlands).
Blocks, all rotation-invariant, over valid pixels only (masked pixels carry no weight):

* ``band_stats`` — per band: mean, std and cube-rooted skewness of reflectance (3·C values);
* ``band_hist``  — per band: a ``hist_bins``-bin histogram of √ρ (bins spread where
  reflectances are, 0–0.3 for most land), Hellinger-mapped (hist_bins·C values);
* ``texture_<image>`` — the RGB descriptor's LBP + Gabor blocks (84 values) on a few derived
  grey images: ``mean`` (the per-pixel band mean: brightness), ``pc1`` (the projection on the
  item's first principal component, min–max stretched: the dominant spectral contrast), and
  ``ndvi`` ((NIR − red)/(NIR + red), mapped to [0, 1]) when the red and NIR bands are known.

So ``dim = C·(3 + hist_bins) + n_images·84``: 201 for 3 bands, 384 for BigEarthNet's 12 bands
with NDVI (8 histogram bins). Input: (C, H, W) float reflectance in [0, 1] with NaN where
masked; output float32 (n, dim), deterministic (float64 inside).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import ImageDecodeError, InvalidArgumentError
from .handcrafted import HandcraftedDescriptor


def _resize(plane: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of one float plane (as the RGB descriptor resizes its images)."""
    im = Image.fromarray(np.ascontiguousarray(plane, np.float32))
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(im, np.float64)


def _hellinger(hist: np.ndarray) -> np.ndarray:
    h = hist / np.maximum(hist.sum(axis=-1, keepdims=True), 1e-12)
    return np.sqrt(h)


def _stretch01(img: np.ndarray) -> np.ndarray:
    """(B, S, S) → per-image min–max to [0, 1] (flat images become 0)."""
    lo = img.min(axis=(1, 2), keepdims=True)
    span = img.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 1e-12, (img - lo) / np.maximum(span, 1e-12), 0.0)


@dataclass(frozen=True)
class MultispectralDescriptor:
    """Configuration for ``count`` bands (``red``/``nir``: 0-based positions, or None)."""

    count: int
    red: int | None = None
    nir: int | None = None
    hist_bins: int = 8
    texture: HandcraftedDescriptor = field(default_factory=HandcraftedDescriptor)

    def __post_init__(self) -> None:
        if self.count < 1:
            raise InvalidArgumentError(f"a multispectral descriptor needs >= 1 band, got {self.count}")
        if (self.red is None) != (self.nir is None):
            raise InvalidArgumentError("give both the red and the NIR band position, or neither")
        for role, i in (("red", self.red), ("nir", self.nir)):
            if i is not None and not 0 <= i < self.count:
                raise InvalidArgumentError(
                    f"{role} band position {i} is outside the {self.count} bands (0-based)")
        if self.hist_bins < 2:
            raise InvalidArgumentError(f"hist_bins must be >= 2, got {self.hist_bins}")

    @property
    def size(self) -> int:
        return self.texture.size

    @property
    def images(self) -> tuple[str, ...]:
        """The derived grey images whose texture is described."""
        return ("mean", "pc1") + (("ndvi",) if self.red is not None else ())

    def block_dims(self) -> dict[str, int]:
        t = self.texture.texture_dim
        return {"band_stats": 3 * self.count, "band_hist": self.hist_bins * self.count,
                **{f"texture_{k}": t for k in self.images}}

    @property
    def dim(self) -> int:
        return sum(self.block_dims().values())

    def config(self) -> dict[str, object]:
        """JSON-able configuration (part of the model's fingerprint)."""
        return {"bands": self.count, "red": self.red, "nir": self.nir,
                "hist_bins": self.hist_bins, "images": list(self.images),
                "texture": self.texture.config()}

    # ---- one item to the working size -----------------------------------------------------
    def working(self, bands: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(C, H, W) reflectance with NaN where masked → ((C, S, S) float64 with masked
        pixels filled by their band's valid mean, (S, S) weights = share of valid pixels)."""
        x = np.asarray(bands)
        if x.ndim != 3 or x.shape[0] != self.count or min(x.shape[1:]) < 1:
            raise ImageDecodeError(
                f"expected {self.count} bands as a (C, H, W) array, got shape {x.shape}: this "
                f"model describes {self.count}-band items; index items with another band "
                "count into another store (and query an all-band store by item, --item-id)")
        x = x.astype(np.float64)
        ok = np.isfinite(x).all(axis=0)
        fill = np.where(ok, x, 0.0).sum(axis=(1, 2)) / max(int(ok.sum()), 1)  # 0 if none
        x = np.where(ok[None], np.clip(np.nan_to_num(x), 0.0, 1.0), fill[:, None, None])
        planes = np.stack([_resize(p, self.size) for p in x])
        w = _resize(ok.astype(np.float64), self.size) if not ok.all() else np.ones(
            (self.size, self.size))
        if w.sum() <= 1e-9:  # nothing valid: describe the (constant) fill uniformly
            w = np.ones_like(w)
        return planes, w

    # ---- blocks (vectorized over the batch) ----------------------------------------------
    def from_working(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """(B, C, S, S) reflectance and (B, S, S) weights → (B, dim) float32."""
        b, c = x.shape[:2]
        if b == 0:
            return np.zeros((0, self.dim), np.float32)
        wn = w / w.sum(axis=(1, 2), keepdims=True)
        mean = np.einsum("bchw,bhw->bc", x, wn)
        d = x - mean[..., None, None]
        var = np.einsum("bchw,bhw->bc", d * d, wn)
        skew = np.cbrt(np.einsum("bchw,bhw->bc", d * d * d, wn))
        stats = np.concatenate([mean, 2.0 * np.sqrt(var), 2.0 * skew], axis=1) / np.sqrt(c)

        nb = self.hist_bins
        q = np.minimum((np.sqrt(np.clip(x, 0.0, 1.0)) * nb).astype(np.int64), nb - 1)
        code = q + nb * np.arange(b * c).reshape(b, c, 1, 1)
        hist = np.bincount(code.ravel(), weights=np.broadcast_to(w[:, None], x.shape).ravel(),
                           minlength=b * c * nb).reshape(b, c, nb)
        hist = _hellinger(hist).reshape(b, c * nb) / np.sqrt(c)

        grey = {"mean": x.mean(axis=1)}
        cov = np.einsum("bchw,bdhw,bhw->bcd", d, d, wn)
        v = np.linalg.eigh(cov)[1][:, :, -1]  # (B, C): the leading eigenvector
        v = v * np.where(v.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)  # a fixed sign
        grey["pc1"] = _stretch01(np.einsum("bc,bchw->bhw", v, x))
        if self.red is not None and self.nir is not None:
            red, nir = x[:, self.red], x[:, self.nir]
            den = nir + red
            ndvi = np.where(den > 1e-6, (nir - red) / np.maximum(den, 1e-6), 0.0)
            grey["ndvi"] = (ndvi + 1.0) / 2.0
        tex = []
        for k in self.images:
            g = grey[k]
            g_u8 = np.round(_stretch01(g) * 255).astype(np.uint8)  # LBP: contrast-invariant
            tex.append(self.texture.texture(g_u8, g) / np.sqrt(len(self.images)))
        return np.concatenate([stats, hist, *tex], axis=1).astype(np.float32)

    def __call__(self, items: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Descriptors of (C, H, W) reflectance arrays of any size: (n, dim) float32."""
        n = len(items)
        out = np.zeros((n, self.dim), np.float32)
        for i in range(0, n, batch_size):
            work = [self.working(a) for a in items[i : i + batch_size]]
            out[i : i + len(work)] = self.from_working(np.stack([p for p, _ in work]),
                                                       np.stack([m for _, m in work]))
        return out
