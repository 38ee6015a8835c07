"""Image regions and their descriptors for cluster-sensitive multi-code hashing.

An image is over-segmented with scikit-image (SLIC superpixels or Felzenszwalb's graph
segmentation; the seed used kernel graph cuts and notes that any segmentation serves), and each
region is described by what the seed names — intensity, texture and shape:

* intensity/colour: mean and standard deviation of CIE L*, a*, b* (6);
* texture: the histogram of rotation-invariant uniform LBP codes (P = 8, R = 1: 10 bins) and
  the mean and standard deviation of the Sobel gradient magnitude (12);
* shape: area fraction, compactness ``4πA/P²`` (P = boundary pixels), eccentricity from the
  second moments, extent (area / bounding-box area) (4).

All per-region statistics are vectorized with ``np.bincount`` over the label image; only the
segmentation itself is per image.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError

SEGMENTATIONS: tuple[str, ...] = ("slic", "felzenszwalb")
LBP_BINS = 10  # uniform rotation-invariant LBP with P = 8 has P + 2 codes
FEATURE_NAMES: tuple[str, ...] = (
    "L_mean", "a_mean", "b_mean", "L_std", "a_std", "b_std",
    *(f"lbp_{i}" for i in range(LBP_BINS)), "grad_mean", "grad_std",
    "area", "compactness", "eccentricity", "extent",
)


@dataclass(frozen=True)
class RegionDescriber:
    """Segment an image (resized to ``size`` × ``size``) and describe every region: ``(R, 22)``
    float64, one row per region (see :data:`FEATURE_NAMES`)."""

    segmentation: str = "slic"
    n_segments: int = 32
    compactness: float = 10.0
    scale: float = 100.0  # Felzenszwalb's observation scale
    min_size: int = 64  # Felzenszwalb's smallest region (px)
    size: int = 128

    def __post_init__(self) -> None:
        if self.segmentation not in SEGMENTATIONS:
            raise InvalidArgumentError(f"unknown segmentation {self.segmentation!r}; choose from "
                             f"{', '.join(SEGMENTATIONS)}")
        if self.size < 8 or self.n_segments < 1:
            raise InvalidArgumentError(f"size must be >= 8 and n_segments >= 1, got {self.size}, "
                             f"{self.n_segments}")

    @property
    def n_features(self) -> int:
        return len(FEATURE_NAMES)

    def rgb(self, image: Any) -> np.ndarray:
        """The image as float RGB in [0, 1] at the working size."""
        from PIL import Image

        im = image if isinstance(image, Image.Image) else Image.fromarray(_as_uint8(image))
        im = im.convert("RGB")
        if im.size != (self.size, self.size):
            im = im.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.float64) / 255.0

    def segment(self, rgb: np.ndarray) -> np.ndarray:
        """Label image (H, W) with regions numbered 0..R-1."""
        from skimage.segmentation import felzenszwalb, slic

        if self.segmentation == "slic":
            lab = slic(rgb, n_segments=self.n_segments, compactness=self.compactness,
                       start_label=0, channel_axis=-1)
        else:
            lab = felzenszwalb(rgb, scale=self.scale, sigma=0.8, min_size=self.min_size)
        _, lab = np.unique(lab, return_inverse=True)  # consecutive labels
        return lab.reshape(rgb.shape[:2])

    def __call__(self, image: Any) -> np.ndarray:
        rgb = self.rgb(image)
        return describe_regions(rgb, self.segment(rgb))

    def describe(self, images: Iterable[Any]) -> list[np.ndarray]:
        """One ``(R_i, 22)`` array per image."""
        return [self(im) for im in images]


def _as_uint8(a: Any) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr


def describe_regions(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Intensity, texture and shape descriptors ``(R, 22)`` of the regions of ``labels``."""
    from skimage.color import rgb2gray, rgb2lab
    from skimage.feature import local_binary_pattern
    from skimage.filters import sobel
    from skimage.segmentation import find_boundaries

    h, w = labels.shape
    lab = labels.ravel()
    r = int(lab.max()) + 1
    area = np.bincount(lab, minlength=r).astype(np.float64)

    def mean_std(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = np.bincount(lab, v, r) / area
        var = np.bincount(lab, v * v, r) / area - m * m
        return m, np.sqrt(np.maximum(var, 0.0))

    cie = rgb2lab(rgb).reshape(-1, 3) / np.array([100.0, 128.0, 128.0])
    colour = [mean_std(cie[:, c]) for c in range(3)]
    gray = rgb2gray(rgb)
    g8 = (gray * 255).astype(np.uint8)
    lbp = local_binary_pattern(g8, 8, 1, method="uniform").astype(np.int64).ravel()
    hist = np.bincount(lab * LBP_BINS + lbp, minlength=r * LBP_BINS).reshape(r, LBP_BINS)
    grad = mean_std(sobel(gray).ravel())
    # shape from pixel coordinates' moments
    yy, xx = np.divmod(np.arange(h * w, dtype=np.float64), w)
    my, mx = np.bincount(lab, yy, r) / area, np.bincount(lab, xx, r) / area
    cyy = np.bincount(lab, yy * yy, r) / area - my * my
    cxx = np.bincount(lab, xx * xx, r) / area - mx * mx
    cxy = np.bincount(lab, xx * yy, r) / area - mx * my
    half_tr, det_root = (cxx + cyy) / 2, np.sqrt(np.maximum(((cxx - cyy) / 2) ** 2 + cxy**2, 0))
    l1, l2 = half_tr + det_root, np.maximum(half_tr - det_root, 0.0)
    ecc = np.sqrt(np.clip(1.0 - l2 / np.maximum(l1, 1e-12), 0.0, 1.0))
    # boundary pixels, the image border included: regions 1..R on a background (0) frame
    edge = find_boundaries(np.pad(labels + 1, 1), mode="inner")[1:-1, 1:-1]
    perim = np.bincount(lab, edge.ravel().astype(float), r)
    compact = np.clip(4 * np.pi * area / np.maximum(perim, 1.0) ** 2, 0.0, 1.0)
    ymin = np.full(r, h, np.float64)
    ymax = np.zeros(r)
    xmin = np.full(r, w, np.float64)
    xmax = np.zeros(r)
    np.minimum.at(ymin, lab, yy)
    np.maximum.at(ymax, lab, yy)
    np.minimum.at(xmin, lab, xx)
    np.maximum.at(xmax, lab, xx)
    extent = area / ((ymax - ymin + 1) * (xmax - xmin + 1))
    cols = [colour[0][0], colour[1][0], colour[2][0], colour[0][1], colour[1][1], colour[2][1]]
    return np.column_stack([
        *cols, hist / area[:, None], grad[0], grad[1], area / (h * w), compact, ecc, extent,
    ])
