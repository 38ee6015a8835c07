"""The archive as files: the walk, resuming (what is new or changed), labels, item records."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InvalidArgumentError, PathNotFoundError
from ..stores.base import EmbeddingStore
from .geo import FilenameTime
from .images import IMAGE_EXTS
from .units import ImageMeta, Source

LabelMap = dict[str, tuple[str | None, list[str]]]


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the archive root, with '/' separators
    size: int
    mtime_ns: int


def scan_folder(root: str | os.PathLike[str]) -> tuple[list[FileEntry], list[FileEntry]]:
    """(image candidates, other files), recursively, sorted; hidden files/dirs are ignored."""
    r = Path(root)
    if not r.exists():
        raise PathNotFoundError(f"archive folder not found: {r}")
    if not r.is_dir():
        raise InvalidArgumentError(f"not a folder: {r} (index a folder of images)")
    images: list[FileEntry] = []
    others: list[FileEntry] = []
    for dirpath, dirnames, filenames in os.walk(r):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            full = Path(dirpath) / fn
            try:
                st = full.stat()
            except OSError:
                continue
            e = FileEntry(full.relative_to(r).as_posix(), st.st_size, st.st_mtime_ns)
            (images if full.suffix.lower() in IMAGE_EXTS else others).append(e)
    return images, others


def read_label_csv(path: str | os.PathLike[str]) -> LabelMap:
    """Labels per file from a CSV: a path column (path/image/file/filename) and either a
    label/class column or 0/1 columns, one per label (multi-label, e.g. UCM multilabels.csv)."""
    df = pd.read_csv(path)
    path_col = next((c for c in df.columns if c.lower() in ("path", "image", "file", "filename")), None)
    if path_col is None:
        raise InvalidArgumentError(f"{path}: no path/image/file/filename column")
    label_col = next((c for c in df.columns if c.lower() in ("label", "class")), None)
    out: dict[str, tuple[str | None, list[str]]] = {}
    paths = df[path_col].astype(str).str.replace("\\", "/", regex=False).tolist()
    if label_col is not None:
        for p, lab in zip(paths, df[label_col].tolist(), strict=True):
            s = None if pd.isna(lab) else str(lab)
            out[p] = (s, [s] if s else [])
        return out
    label_cols = [c for c in df.columns if c != path_col]
    mat = df[label_cols].to_numpy()
    if not np.isin(mat, [0, 1]).all():
        raise InvalidArgumentError(f"{path}: label columns must be 0/1 (or give a 'label' column)")
    names = np.array(label_cols, dtype=object)
    for p, row in zip(paths, mat.astype(bool), strict=True):
        out[p] = (None, names[row].tolist())
    return out


def changed_mask(store: EmbeddingStore, paths: list[str], sizes: np.ndarray,
                 mtimes: np.ndarray) -> np.ndarray:
    """True for each (path, size, mtime) that is not already in the store as it is."""
    if not paths or len(store) == 0:
        return np.ones(len(paths), bool)
    cur = pd.DataFrame({"path": paths, "size": np.asarray(sizes, np.int64),
                        "mtime_ns": np.asarray(mtimes, np.int64)})
    have = store.files().drop_duplicates("path")
    merged = cur.merge(have, on=["path", "size", "mtime_ns"], how="left", indicator=True)
    return (merged["_merge"] == "left_only").to_numpy()


def changed_entries(store: EmbeddingStore, entries: list[FileEntry]) -> list[FileEntry]:
    """Entries whose (path, size, mtime) is not already in the store."""
    keep = changed_mask(store, [e.path for e in entries],
                        np.array([e.size for e in entries], np.int64),
                        np.array([e.mtime_ns for e in entries], np.int64))
    return [e for e, k in zip(entries, keep, strict=True) if k]


def item_record(
    path: str,
    source: Source,
    meta: ImageMeta | None,
    labels: str,
    label_map: LabelMap | None,
    datetime_from: FilenameTime | None = None,
) -> dict[str, Any]:
    """One item's metadata: the unit's path, its source file's size and mtime (what resuming
    compares), labels, and where/when: what the archive states (``source.extra``: labels,
    datetime) wins over a ``--datetime-from`` file-name time, which wins over what decoding
    read in the file; a footprint the archive states is used where the raster has none."""
    label: str | None = None
    label_list: list[str] = []
    if labels == "folder":
        parent = Path(source.path).parent.name if "://" not in source.path else ""
        label = parent or None
        label_list = [label] if label else []
    if label_map is not None:
        hit = (label_map.get(path) or label_map.get(source.path)
               or label_map.get(Path(source.path).name))
        if hit is not None:
            csv_label, csv_labels = hit
            label = csv_label or label
            label_list = csv_labels or label_list
    m = meta or ImageMeta(-1, -1)
    dt = m.datetime
    if datetime_from is not None:
        dt = datetime_from.parse(source.path) or dt
    rec = {
        "path": path, "size": source.size, "mtime_ns": source.mtime_ns, "width": m.width,
        "height": m.height, "label": label, "labels": label_list, "lon": m.lon, "lat": m.lat,
        "datetime": dt, "crs": m.crs, "footprint": m.footprint,
        "footprint_native": m.footprint_native,
    }
    for k, v in source.extra.items():
        if k in GEO_FALLBACK:  # the raster's own footprint (a chip's) is more precise
            cur = rec.get(k)
            if cur is None or (isinstance(cur, float) and cur != cur):  # None or NaN
                rec[k] = v
        else:
            rec[k] = v
    return rec


GEO_FALLBACK = frozenset({"lon", "lat", "crs", "footprint", "footprint_native"})
