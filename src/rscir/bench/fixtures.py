"""Generated PatternNet/PatternCom trees with synthetic features, for tests and speed benchmarks.

The layout is the real one::

    PatternNet/images/<class_folder>/<class><NNN>.jpg     (e.g. dense_residential/denseresidential001.jpg)
    PatternNet/patternnet.csv                              filename,class
    PatternNet/PatternCom/<attribute>.csv                  filename,attribute,value (no header)

plus, next to it, the features: a reference-layout pickle (``feats`` N×d, ``labels``, ``paths``)
and the text features (``texts`` + ``features`` npz). Features are built so the methods differ
in a meaningful way: an image is its class direction plus the directions of its attribute values
plus noise; a text is its value's direction plus a little noise; both modalities carry their own
offset (``modality_gap``), so raw cross-modal similarities are small and compressed as with CLIP
models, which is what WeiCom's normalization is for. At the default size (38 × 800 images,
768 dims, ~21k CSV rows, ~47k pairs) the methods differ clearly: image ≈ 14, text ≈ 16,
average ≈ 59 and WeiCom (λ = 0.5) ≈ 65 mAP.
"""

from __future__ import annotations

import csv
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError
from .patterncom import class_of, save_text_features

PATTERNNET_FOLDERS: tuple[str, ...] = (
    "airplane", "baseball_field", "basketball_court", "beach", "bridge", "cemetery", "chaparral",
    "christmas_tree_farm", "closed_road", "coastal_mansion", "crosswalk", "dense_residential",
    "ferry_terminal", "football_field", "forest", "freeway", "golf_course", "harbor",
    "intersection", "mobile_home_park", "nursing_home", "oil_gas_field", "oil_well", "overpass",
    "parking_lot", "parking_space", "railway", "river", "runway", "runway_marking",
    "shipping_yard", "solar_panel", "sparse_residential", "storage_tank", "swimming_pool",
    "tennis_court", "transformer_station", "wastewater_treatment_plant",
)

# attribute -> class (file-name form) -> values it takes. Modeled on PatternCom: merged classes
# (residential, road, roadpass, pier, parking) share values, and harbor/ferryterminal also appear
# in "color", where only the relevance merge applies.
PATTERNCOM_SPEC: dict[str, dict[str, tuple[str, ...]]] = {
    "color": {
        "tenniscourt": ("red", "green", "blue"),
        "basketballcourt": ("red", "green", "blue", "gray"),
        "swimmingpool": ("blue", "green", "turquoise"),
        "footballfield": ("green", "brown", "red"),
        "runwaymarking": ("white", "yellow", "gray"),
        "harbor": ("blue", "green", "brown"),
        "ferryterminal": ("blue", "white", "gray"),
        "solarpanel": ("blue", "black", "gray"),
    },
    "context": {
        "bridge": ("over water", "over road"),
        "overpass": ("over road", "over railway", "over highway"),
        "crosswalk": ("urban", "rural", "suburban"),
        "railway": ("urban", "rural", "forest"),
        "river": ("forest", "urban", "farmland"),
        "freeway": ("urban", "rural", "desert"),
        "golfcourse": ("coastal", "inland", "forest"),
    },
    "density": {
        "denseresidential": ("dense", "medium"),
        "sparseresidential": ("sparse", "medium", "very sparse"),
        "christmastreefarm": ("dense", "sparse", "medium"),
        "forest": ("dense", "sparse", "medium"),
        "mobilehomepark": ("dense", "sparse", "medium"),
        "parkinglot": ("dense", "sparse", "empty"),
        "cemetery": ("dense", "sparse", "medium"),
    },
    "existence": {
        "ferryterminal": ("boats", "no boats"),
        "harbor": ("boats", "no boats", "ships"),
        "parkingspace": ("cars", "no cars"),
        "parkinglot": ("cars", "no cars", "trucks"),
        "runway": ("airplanes", "no airplanes", "vehicles"),
        "beach": ("people", "no people", "umbrellas"),
        "coastalmansion": ("pool", "no pool", "boat"),
    },
    "quantity": {
        "storagetank": ("one", "two", "three", "many"),
        "oilwell": ("one", "two", "many"),
        "airplane": ("one", "two", "three", "many"),
        "transformerstation": ("one", "two", "three"),
        "swimmingpool": ("one", "two", "many"),
        "tenniscourt": ("one", "two", "three", "many"),
        "baseballfield": ("one", "two", "three"),
    },
    "shape": {
        "closedroad": ("straight", "curved"),
        "intersection": ("cross", "t-junction", "roundabout"),
        "swimmingpool": ("oval", "rectangular", "kidney-shaped"),
        "wastewatertreatmentplant": ("round", "rectangular", "mixed"),
        "nursinghome": ("l-shaped", "u-shaped", "rectangular"),
        "shippingyard": ("rectangular", "irregular", "square"),
        "storagetank": ("round", "square", "mixed"),
    },
}


@dataclass(frozen=True)
class PatternComFixture:
    """Paths of a generated tree and the arrays written into it."""

    root: Path  # the PatternNet folder
    features_path: Path  # reference-layout pickle
    text_features_path: Path  # texts + features npz
    features: np.ndarray  # (N, d) float32, L2-normalized
    paths: list[str]  # relative to root, images/<folder>/<file>
    labels: list[str]  # folder names
    text_features: dict[str, np.ndarray]


def file_class(folder: str) -> str:
    return folder.replace("_", "")


def make_patterncom(
    out_dir: str | Path,
    *,
    folders: tuple[str, ...] = PATTERNNET_FOLDERS,
    per_class: int = 800,
    dim: int = 768,
    spec: dict[str, dict[str, tuple[str, ...]]] | None = None,
    labeled_fraction: float = 0.6,
    duplicate_rows: int = 0,
    write_images: bool = False,
    image_size: int = 16,
    noise: float = 1.5,
    value_weight: float = 0.25,
    modality_gap: float = 1.5,
    seed: int = 0,
) -> PatternComFixture:
    """Write ``out_dir/PatternNet`` (+ features) and return what was written.

    ``labeled_fraction`` of each listed class's images appear in an attribute CSV;
    ``duplicate_rows`` extra rows repeat random earlier file names of each attribute with a
    random value of their class (so the last-row-wins rule matters). With ``write_images``, tiny
    JPEGs (colored by class) are written so an encoder can index the tree; otherwise the image
    files are not created (features-only benchmarks).
    """
    rng = np.random.default_rng(seed)
    spec = PATTERNCOM_SPEC if spec is None else spec
    known = {file_class(f) for f in folders}
    for attr, by_cls in spec.items():
        for cls in by_cls:
            if cls not in known:
                raise InvalidArgumentError(f"spec class {cls!r} ({attr}) is not one of the folders")
    root = Path(out_dir) / "PatternNet"
    (root / "PatternCom").mkdir(parents=True, exist_ok=True)

    paths: list[str] = []
    labels: list[str] = []
    cls_of_row: list[str] = []
    for folder in folders:
        cls = file_class(folder)
        for i in range(1, per_class + 1):
            paths.append(f"images/{folder}/{cls}{i:03d}.jpg")
            labels.append(folder)
            cls_of_row.append(cls)
    rows_by_cls: dict[str, np.ndarray] = {}
    cls_arr = np.array(cls_of_row)
    for cls in known:
        rows_by_cls[cls] = np.flatnonzero(cls_arr == cls)

    def unit(k: int) -> np.ndarray:
        v = rng.standard_normal((k, dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    class_dirs = dict(zip(sorted(known), unit(len(known)), strict=True))
    all_values = sorted({v for by_cls in spec.values() for vals in by_cls.values() for v in vals})
    value_dirs = dict(zip(all_values, unit(len(all_values)), strict=True))

    feats = np.stack([class_dirs[c] for c in cls_of_row]).astype(np.float32)
    value_part = np.zeros_like(feats)
    csv_rows: dict[str, list[tuple[str, str, str]]] = {}
    for attr in spec:
        rows: list[tuple[str, str, str]] = []
        for cls, values in spec[attr].items():
            members = rows_by_cls[cls]
            k = max(1, int(round(labeled_fraction * len(members))))
            chosen = np.sort(rng.choice(members, size=k, replace=False))
            picks = rng.integers(0, len(values), size=k)
            for r, v in zip(chosen, picks, strict=True):
                rows.append((paths[r].rsplit("/", 1)[1], attr, values[v]))
                value_part[r] += value_dirs[values[v]]
        order = rng.permutation(len(rows))
        rows = [rows[i] for i in order]
        for _ in range(duplicate_rows):
            fname = rows[int(rng.integers(len(rows)))][0]
            cls = class_of(fname)
            vals = spec[attr][cls]
            rows.append((fname, attr, vals[int(rng.integers(len(vals)))]))
        csv_rows[attr] = rows
    gap_img, gap_txt = unit(2)
    noise_mat = rng.standard_normal(feats.shape).astype(np.float32) / np.sqrt(dim)
    feats = feats + value_weight * value_part + noise * noise_mat + modality_gap * gap_img
    feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)
    text_feats = {}
    for v in all_values:
        t = value_dirs[v] + 0.3 * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
        t = t + modality_gap * gap_txt
        text_feats[v] = (t / np.linalg.norm(t)).astype(np.float32)

    for attr, rows in csv_rows.items():
        with open(root / "PatternCom" / f"{attr}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    with open(root / "patternnet.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "class"])
        w.writerows(zip(paths, labels, strict=True))
    if write_images:
        _write_images(root, paths, labels, image_size, rng)
    feats_path = Path(out_dir) / "patternnet_features.pkl"
    with open(feats_path, "wb") as fb:
        pickle.dump({"feats": feats, "labels": labels, "paths": paths}, fb)
    text_path = Path(out_dir) / "patterncom_texts.npz"
    save_text_features(text_path, text_feats)
    return PatternComFixture(root, feats_path, text_path, feats, paths, labels, text_feats)


def _write_images(
    root: Path, paths: list[str], labels: list[str], size: int, rng: np.random.Generator
) -> None:
    from PIL import Image

    base = {lab: rng.integers(0, 256, size=3) for lab in sorted(set(labels))}
    for p, lab in zip(paths, labels, strict=True):
        full = root / p
        full.parent.mkdir(parents=True, exist_ok=True)
        px = np.clip(base[lab] + rng.integers(-40, 41, size=(size, size, 3)), 0, 255)
        Image.fromarray(px.astype(np.uint8)).save(full, quality=90)

