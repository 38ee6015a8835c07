"""BigEarthNet-S2 as an archive: patches of 12 Sentinel-2 band files with multi-labels.

Two layouts are read (detected by :func:`detect`):

* **v1** (BigEarthNet-S2 v1.0, 590,326 patches): ``ROOT/<patch>/<patch>_B01.tif … _B12.tif``
  (B01–B12 and B8A; 10 m bands 120×120 px, 20 m 60×60, 60 m 20×20) and
  ``<patch>_labels_metadata.json`` with the 43-class CORINE ``labels``, ``coordinates``,
  ``projection``, ``tile_source`` and ``acquisition_date``.
* **v2 / reBEN** (BigEarthNet v2.0): ``ROOT/metadata.parquet`` (``patch_id``, 19-class
  ``labels``, ``split``, ``country``, ...) and the band files under
  ``ROOT/BigEarthNet-S2/<tile>/<patch_id>/<patch_id>_B02.tif`` (``<tile>`` is the patch id
  without its two last ``_``-parts); the acquisition time is the one in the patch id.

Each patch is one item whose path is its folder. RGB models see B04, B03, B02 (or ``--bands``,
by S2 band name) with the ``sentinel2-l2a`` stretch; bands of coarser resolution are
resampled (bilinear) to the 10 m grid. Labels go into the store's multi-labels: the 19-class
nomenclature (default; v1's 43 classes are mapped as in Sumbul et al. 2021) or the 43 classes
of v1 (``--bigearthnet-labels 43``). The footprint comes from the band files' georeferencing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import InvalidArgumentError
from .geo import to_utc_iso
from .sensors import PRESETS, S2_L2A
from .units import Source

log = logging.getLogger(__name__)

CLASSES_43: tuple[str, ...] = (
    "Continuous urban fabric", "Discontinuous urban fabric", "Industrial or commercial units",
    "Road and rail networks and associated land", "Port areas", "Airports",
    "Mineral extraction sites", "Dump sites", "Construction sites", "Green urban areas",
    "Sport and leisure facilities", "Non-irrigated arable land", "Permanently irrigated land",
    "Rice fields", "Vineyards", "Fruit trees and berry plantations", "Olive groves", "Pastures",
    "Annual crops associated with permanent crops", "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland", "Moors and heathland", "Sclerophyllous vegetation",
    "Transitional woodland/shrub", "Beaches, dunes, sands", "Bare rock",
    "Sparsely vegetated areas", "Burnt areas", "Inland marshes", "Peatbogs", "Salt marshes",
    "Salines", "Intertidal flats", "Water courses", "Water bodies", "Coastal lagoons",
    "Estuaries", "Sea and ocean",
)
CLASSES_19: tuple[str, ...] = (
    "Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops",
    "Pastures", "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation", "Transitional woodland, shrub",
    "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands", "Inland waters",
    "Marine waters",
)
# 43-class index -> 19-class index (classes without a 19-class counterpart are dropped)
MAP_43_TO_19: dict[int, int] = {
    0: 0, 1: 0, 2: 1, 11: 2, 12: 2, 13: 2, 14: 3, 15: 3, 16: 3, 18: 3, 17: 4, 19: 5, 20: 6,
    21: 7, 22: 8, 23: 9, 24: 10, 25: 11, 31: 11, 26: 12, 27: 12, 28: 13, 29: 14, 33: 15,
    34: 15, 35: 16, 36: 16, 38: 17, 39: 17, 40: 18, 41: 18, 42: 18,
}
RGB = ("B04", "B03", "B02")
V2_FOLDER = "BigEarthNet-S2"
V2_METADATA = "metadata.parquet"


def to_19(labels43: Sequence[str]) -> list[str]:
    """The 19-class labels of a v1 patch's 43-class labels (sorted, unique)."""
    idx = {c: i for i, c in enumerate(CLASSES_43)}
    out = {CLASSES_19[MAP_43_TO_19[idx[c]]] for c in labels43 if idx.get(c) in MAP_43_TO_19}
    return sorted(out)


def band_names(bands: Sequence[str | int] | None) -> tuple[str, ...]:
    """S2 band names of ``--bands`` (names or 1-based indices in the 12-band L2A order)."""
    if not bands:
        return RGB
    preset = PRESETS["sentinel2-l2a"]
    out = []
    for b in bands:
        i = b if isinstance(b, int) else preset.index_of(b)
        if i is None or not 1 <= i <= len(S2_L2A):
            raise InvalidArgumentError(
                f"BigEarthNet has no band {b!r}; bands: {', '.join(S2_L2A)}")
        out.append(S2_L2A[i - 1])
    return tuple(out * 3 if len(out) == 1 else out)


@dataclass
class Patches:
    """A BigEarthNet archive's patches as sources (labels filled by :meth:`complete`)."""

    version: int
    root: Path
    sources: list[Source]
    missing: list[str]
    label_set: int
    v2_labels: dict[str, list[str]] | None = None

    def complete(self, sources: list[Source]) -> list[Source]:
        """Sources with their labels and acquisition time (read only for those to embed)."""
        out = []
        for s in sources:
            name = Path(s.path).name
            if self.version == 1:
                extra = _v1_extra(self.root / s.path / f"{name}_labels_metadata.json",
                                  self.label_set)
            else:
                assert self.v2_labels is not None
                extra = {"label": None, "labels": list(self.v2_labels.get(name, [])),
                         "datetime": _patch_time(name)}
            out.append(replace(s, extra={**s.extra, **extra}))
        return out


def _patch_time(patch: str) -> str | None:
    """The sensing time in a Sentinel-2 product-based patch name (``..._20170613T101031_...``);
    the date alone (00:00 UTC) when the time part is garbled (some v1 names: ``T94161``)."""
    for part in patch.split("_"):
        if len(part) >= 9 and part[8] == "T" and part[:8].isdigit():
            day = f"{part[:4]}-{part[4:6]}-{part[6:8]}"
            t = part[9:]
            if len(t) == 6 and t.isdigit():
                full = to_utc_iso(f"{day}T{t[:2]}:{t[2:4]}:{t[4:]}")
                if full is not None:
                    return full
            return to_utc_iso(day)
    return None


def _v1_extra(meta_file: Path, label_set: int) -> dict[str, object]:
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); the patch gets no labels", meta_file, e)
        return {"label": None, "labels": []}
    labels = [str(x) for x in meta.get("labels", [])]
    return {
        "label": None,
        "labels": sorted(labels) if label_set == 43 else to_19(labels),
        "datetime": to_utc_iso(meta.get("acquisition_date")) or _patch_time(meta_file.parent.name),
    }


def detect(root: Path) -> int | None:
    """1 or 2 when ``root`` holds a BigEarthNet-S2 archive of that layout, else None."""
    if (root / V2_METADATA).is_file() and ((root / V2_FOLDER).is_dir() or any(
            p.is_dir() and p.name.startswith("S2") for p in root.iterdir())):
        return 2
    try:
        with os.scandir(root) as it:
            for n, e in enumerate(it):
                if e.is_dir() and (Path(e.path) / f"{e.name}_labels_metadata.json").is_file():
                    return 1
                if n > 50:
                    break
    except OSError:
        return None
    return None


def _stat(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def scan(root: Path, version: int, bands: Sequence[str | int] | None,
         label_set: int = 19) -> Patches:
    """The patches of a BigEarthNet archive, in name order, with their band files."""
    if label_set not in (19, 43):
        raise InvalidArgumentError(f"BigEarthNet labels are 19 or 43 classes, not {label_set}")
    names = band_names(bands)
    sources: list[Source] = []
    missing: list[str] = []
    v2_labels: dict[str, list[str]] | None = None
    if version == 1:
        dirs = sorted(e.name for e in os.scandir(root) if e.is_dir()
                      and not e.name.startswith("."))
        rels = [(d, d) for d in dirs]
    else:
        if label_set == 43:
            raise InvalidArgumentError(
                "BigEarthNet v2 (reBEN) labels are the 19 classes only; drop "
                "--bigearthnet-labels 43")
        import pyarrow.parquet as pq

        table = pq.read_table(root / V2_METADATA, columns=["patch_id", "labels"])
        ids = [str(x) for x in table.column("patch_id").to_pylist()]
        v2_labels = dict(zip(ids, ([str(y) for y in (x or [])]
                                   for x in table.column("labels").to_pylist()), strict=True))
        base = V2_FOLDER if (root / V2_FOLDER).is_dir() else ""
        rels = sorted(((f"{base}/" if base else "") + "_".join(p.split("_")[:-2]) + f"/{p}", p)
                      for p in ids)
    for rel, name in rels:
        files = tuple(f"{rel}/{name}_{b}.tif" for b in names)
        st = _stat(root / files[0])
        if st is None:
            if version == 2 or (root / rel / f"{name}_labels_metadata.json").is_file():
                missing.append(rel)
            continue
        sources.append(Source(rel, st[0], st[1], files))
    return Patches(version, root, sources, missing, label_set, v2_labels)


def patch_files(rel: str, bands: Sequence[str | int] | None) -> tuple[str, ...]:
    """Band files of a patch folder (for thumbnails of a BigEarthNet store)."""
    name = Path(rel).name
    return tuple(f"{rel}/{name}_{b}.tif" for b in band_names(bands))
