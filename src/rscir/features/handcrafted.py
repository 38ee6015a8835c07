"""A classic colour + texture descriptor for aerial scenes, computed without any model weights.

This is the setting of the hashing literature on remote-sensing retrieval (Demir & Bruzzone):
global colour statistics plus rotation-invariant texture. Blocks (all rotation-invariant, which
suits overhead imagery that has no "up"):

* ``hsv_hist``  — joint HSV histogram (8 hue × 3 saturation × 3 value bins), Hellinger-mapped;
* ``color_mom`` — mean, std and (cube-rooted) skewness of R, G, B, H, S, V, scaled to ~[0, 1];
* ``lbp``       — uniform rotation-invariant LBP histograms at (P, R) = (8, 1) and (16, 2),
  Hellinger-mapped (``skimage.feature.local_binary_pattern``);
* ``gabor``     — mean and std of Gabor magnitude responses (``skimage.filters.gabor_kernel``)
  at several frequencies and orientations (circularly shifted so the dominant orientation comes
  first), plus their orientation-pooled means, log-compressed.

Images of any size are resized to a fixed working size first, so descriptors are comparable
across archives. Gabor filtering is done with FFTs for the whole batch at once (hand-written
because ``skimage.filters.gabor`` convolves one image and one kernel at a time in the spatial
domain, ~20× slower at these kernel sizes); the kernels themselves come from scikit-image.

The output is deterministic (no randomness; float64 internally) and float32 of shape (n, D).
Each block is scaled to unit-ish magnitude so no block dominates a dot product; consumers that
need zero-mean features (hashing, an MLP) standardize with their own training statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import scipy.fft
from PIL import Image
from skimage.color import rgb2hsv
from skimage.feature import local_binary_pattern
from skimage.filters import gabor_kernel

from ..errors import InvalidArgumentError

ImageLike = Image.Image | np.ndarray


def to_working_array(image: ImageLike, size: int = 128) -> np.ndarray:
    """PIL image or HxW[xC] array (uint8, or float in [0, 1]) -> (size, size, 3) uint8 RGB.

    Picklable and cheap, so it can run in DataLoader workers."""
    if isinstance(image, Image.Image):
        im = image.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or min(arr.shape[:2]) < 1:
            raise InvalidArgumentError(f"expected an HxW or HxWxC image array, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            a = arr.astype(np.float64)
            if np.nanmax(a, initial=0.0) <= 1.0:
                a = a * 255.0
            arr = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        im = Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(im, dtype=np.uint8)


@lru_cache(maxsize=8)
def _gabor_bank_fft(
    size: int, frequencies: tuple[float, ...], n_orient: int
) -> np.ndarray:
    """FFTs of zero-padded, centred Gabor kernels, shape (F*O, size, size) complex64.

    Kernels are DC-free (mean removed) so flat regions respond ~0 whatever their brightness."""
    bank = np.zeros((len(frequencies) * n_orient, size, size), np.complex128)
    for fi, f in enumerate(frequencies):
        for oi in range(n_orient):
            k = gabor_kernel(f, theta=np.pi * oi / n_orient)
            k = k - k.mean()
            h, w = k.shape
            if h > size or w > size:  # crop very wide low-frequency kernels to the image
                cy, cx = h // 2, w // 2
                r = size // 2
                k = k[max(cy - r, 0) : cy + r, max(cx - r, 0) : cx + r]
                h, w = k.shape
            pad = np.zeros((size, size), np.complex128)
            pad[:h, :w] = k
            pad = np.roll(pad, (-(h // 2), -(w // 2)), axis=(0, 1))  # centre at the origin
            bank[fi * n_orient + oi] = np.fft.fft2(pad)
    bank64 = bank.astype(np.complex64)
    bank64.setflags(write=False)
    return bank64


def _hellinger(hist: np.ndarray) -> np.ndarray:
    h = hist.astype(np.float64)
    h /= np.maximum(h.sum(axis=-1, keepdims=True), 1e-12)
    return np.sqrt(h)


@dataclass(frozen=True)
class HandcraftedDescriptor:
    """Configuration of the descriptor; call it on a batch of images."""

    size: int = 128
    hue_bins: int = 8
    sat_bins: int = 3
    val_bins: int = 3
    lbp_scales: tuple[tuple[int, float], ...] = ((8, 1.0), (16, 2.0))
    gabor_frequencies: tuple[float, ...] = (0.05, 0.1, 0.2, 0.35)
    gabor_orientations: int = 6
    block_weights: dict[str, float] = field(
        default_factory=lambda: {"hsv_hist": 1.0, "color_mom": 1.0, "lbp": 1.0, "gabor": 1.0}
    )

    def __post_init__(self) -> None:
        if self.size < 16:
            raise InvalidArgumentError(f"working size must be at least 16 px, got {self.size}")

    # ---- layout ---------------------------------------------------------------------------
    def block_dims(self) -> dict[str, int]:
        n_f, n_o = len(self.gabor_frequencies), self.gabor_orientations
        return {
            "hsv_hist": self.hue_bins * self.sat_bins * self.val_bins,
            "color_mom": 18,
            "lbp": sum(p + 2 for p, _ in self.lbp_scales),
            "gabor": 2 * n_f * n_o + 2 * n_f,
        }

    @property
    def dim(self) -> int:
        return sum(self.block_dims().values())

    def config(self) -> dict[str, object]:
        """JSON-able configuration (stored in a model's preprocessing info / fingerprint)."""
        return {
            "size": self.size,
            "hsv_bins": [self.hue_bins, self.sat_bins, self.val_bins],
            "lbp_scales": [list(s) for s in self.lbp_scales],
            "gabor_frequencies": list(self.gabor_frequencies),
            "gabor_orientations": self.gabor_orientations,
            "block_weights": dict(sorted(self.block_weights.items())),
        }

    # ---- blocks (vectorized over the batch) -------------------------------------------------
    def _hsv_hist(self, hsv: np.ndarray) -> np.ndarray:
        b = hsv.shape[0]
        bins = np.array([self.hue_bins, self.sat_bins, self.val_bins])
        q = np.minimum((hsv * bins).astype(np.int64), bins - 1)  # (B, H, W, 3)
        code = (q[..., 0] * self.sat_bins + q[..., 1]) * self.val_bins + q[..., 2]
        n = int(np.prod(bins))
        flat = code.reshape(b, -1) + (np.arange(b) * n)[:, None]
        hist = np.bincount(flat.ravel(), minlength=b * n).reshape(b, n)
        return _hellinger(hist)

    @staticmethod
    def _color_moments(rgb01: np.ndarray, hsv: np.ndarray) -> np.ndarray:
        x = np.concatenate([rgb01, hsv], axis=-1).reshape(rgb01.shape[0], -1, 6)
        mean = x.mean(axis=1)
        c = x - mean[:, None, :]
        c2 = c * c
        std = np.sqrt(c2.mean(axis=1))
        skew = np.cbrt((c2 * c).mean(axis=1))  # cube root keeps the unit of the channel
        return np.concatenate([mean, 2.0 * std, 2.0 * skew], axis=1)

    def _lbp(self, gray_u8: np.ndarray) -> np.ndarray:
        out = []
        for img in gray_u8:  # skimage's LBP is per image (Cython); cost is per pixel anyway
            hs = []
            for p, r in self.lbp_scales:
                codes = local_binary_pattern(img, p, r, method="uniform").astype(np.int64)
                hs.append(_hellinger(np.bincount(codes.ravel(), minlength=p + 2)[None])[0])
            out.append(np.concatenate(hs))
        return np.asarray(out, np.float64).reshape(len(gray_u8), -1)

    def _gabor(self, gray01: np.ndarray) -> np.ndarray:
        bank = _gabor_bank_fft(self.size, tuple(self.gabor_frequencies), self.gabor_orientations)
        n_f, n_o = len(self.gabor_frequencies), self.gabor_orientations
        g = (gray01 - gray01.mean(axis=(1, 2), keepdims=True)).astype(np.float32)
        spec = scipy.fft.fft2(g)  # (B, S, S) complex64: single precision is plenty for stats
        resp = scipy.fft.ifft2(spec[:, None] * bank[None], overwrite_x=True)  # (B, F*O, S, S)
        mags = np.abs(resp).astype(np.float64)
        mean = mags.mean(axis=(2, 3)).reshape(-1, n_f, n_o)
        std = mags.std(axis=(2, 3)).reshape(-1, n_f, n_o)
        # rotation invariance: circularly shift orientations so the dominant one comes first
        # (a rotation by a multiple of 180°/O then gives the same features)
        dominant = mean.sum(axis=1).argmax(axis=1)  # (B,)
        idx = (np.arange(n_o)[None, :] + dominant[:, None]) % n_o  # (B, O)
        mean = np.take_along_axis(mean, idx[:, None, :], axis=2)
        std = np.take_along_axis(std, idx[:, None, :], axis=2)
        # orientation-pooled energy per frequency: a rotation-invariant summary
        pooled_mean, pooled_std = mean.mean(axis=2), std.mean(axis=2)
        b = mean.shape[0]
        feats = np.concatenate(
            [mean.reshape(b, -1), std.reshape(b, -1), pooled_mean, pooled_std], axis=1
        )
        return np.log1p(20.0 * feats) / 2.0  # compress the heavy tail of texture energy

    def texture(self, gray_u8: np.ndarray, gray01: np.ndarray) -> np.ndarray:
        """The LBP and Gabor blocks of (B, size, size) grey images, scaled as in
        :meth:`from_arrays` (for descriptors of other images, e.g. multispectral ones)."""
        return np.concatenate([self._lbp(gray_u8) / np.sqrt(len(self.lbp_scales)),
                               self._gabor(gray01) * 1.5], axis=1)

    @property
    def texture_dim(self) -> int:
        d = self.block_dims()
        return d["lbp"] + d["gabor"]

    def from_arrays(self, batch: np.ndarray) -> np.ndarray:
        """(B, size, size, 3) uint8 -> (B, D) float32 descriptors."""
        arr = np.asarray(batch)
        if arr.ndim != 4 or arr.shape[1:] != (self.size, self.size, 3) or arr.dtype != np.uint8:
            raise InvalidArgumentError(
                f"expected a (B, {self.size}, {self.size}, 3) uint8 batch, got "
                f"{arr.shape} {arr.dtype}; use to_working_array() first"
            )
        if arr.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        rgb01 = arr.astype(np.float64) / 255.0
        hsv = rgb2hsv(rgb01, channel_axis=-1)
        gray01 = rgb01 @ np.array([0.2125, 0.7154, 0.0721])
        gray_u8 = np.round(gray01 * 255).astype(np.uint8)
        blocks = {
            "hsv_hist": self._hsv_hist(hsv),
            "color_mom": self._color_moments(rgb01, hsv),
            "lbp": self._lbp(gray_u8),
            "gabor": self._gabor(gray01),
        }
        w = self.block_weights
        # each block to ~unit norm so blocks weigh as configured, not as their sizes/units say
        scale = {
            "hsv_hist": 1.0,
            "color_mom": 1.0 / np.sqrt(6.0),
            "lbp": 1.0 / np.sqrt(len(self.lbp_scales)),
            "gabor": 1.5,
        }
        out = np.concatenate([blocks[k] * (w.get(k, 1.0) * scale[k]) for k in blocks], axis=1)
        return out.astype(np.float32)

    def __call__(self, images: Sequence[ImageLike] | np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Descriptors of PIL images / arrays of any size; (n, D) float32."""
        n = len(images)
        out = np.zeros((n, self.dim), np.float32)
        for i in range(0, n, batch_size):
            chunk = np.stack([to_working_array(im, self.size) for im in images[i : i + batch_size]])
            out[i : i + len(chunk)] = self.from_arrays(chunk)
        return out


def describe_arrays(batch: np.ndarray, descriptor: HandcraftedDescriptor | None = None) -> np.ndarray:
    """Descriptors of a (B, size, size, 3) uint8 batch already at the working size."""
    return (descriptor or HandcraftedDescriptor()).from_arrays(batch)


def describe(
    images: Sequence[ImageLike] | np.ndarray,
    descriptor: HandcraftedDescriptor | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Hand-crafted descriptors for RGB images of any size: (n, D) float32, deterministic."""
    return (descriptor or HandcraftedDescriptor())(images, batch_size=batch_size)
