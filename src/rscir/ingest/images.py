"""Archive ingestion: walk a folder, decode images robustly in parallel, embed, append to a store.

Decoding runs in DataLoader worker processes (with the encoder's picklable ``preprocess``) while
the model embeds in the main process. One bad file never stops a run: corrupt, truncated, empty,
non-image and oversized (decompression-bomb) files are skipped and listed with the reason.
Re-running on the same folder embeds only new or changed files (by size and mtime).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from ..encoders.base import Encoder
from ..errors import ImageDecodeError
from ..stores.directory import Store

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})
TIFF_EXTS = frozenset({".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 100_000_000  # ~10k × 10k; larger files are treated as decompression bombs


@dataclass(frozen=True)
class ImageMeta:
    width: int
    height: int
    lon: float = float("nan")
    lat: float = float("nan")


def _scale_to_uint8(bands: np.ndarray) -> np.ndarray:
    """(C,H,W) any dtype → uint8 with a per-band 2–98 percentile stretch (uint8 is kept)."""
    if bands.dtype == np.uint8:
        return bands
    b = bands.astype(np.float64)
    out = np.empty(b.shape, np.uint8)
    for i in range(b.shape[0]):
        finite = b[i][np.isfinite(b[i])]
        lo, hi = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
        if hi <= lo:
            hi = lo + 1.0
        out[i] = np.clip((np.nan_to_num(b[i], nan=lo) - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    return out


def _load_tiff(path: Path, max_pixels: int) -> tuple[Image.Image, ImageMeta]:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    from rasterio.warp import transform as warp_transform

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                w, h = ds.width, ds.height
                if w * h > max_pixels:
                    raise ImageDecodeError(f"oversized image {w}x{h} > {max_pixels} pixels")
                ci = [c.name.lower() for c in ds.colorinterp]
                if all(c in ci for c in ("red", "green", "blue")):
                    idx = [ci.index("red") + 1, ci.index("green") + 1, ci.index("blue") + 1]
                elif ds.count >= 3:
                    idx = [1, 2, 3]
                else:
                    idx = [1, 1, 1]
                bands = ds.read(idx)
                lon = lat = float("nan")
                if ds.crs is not None and not ds.transform.is_identity:
                    t = ds.transform
                    cx = t.c + t.a * w / 2.0 + t.b * h / 2.0
                    cy = t.f + t.d * w / 2.0 + t.e * h / 2.0
                    xs, ys = warp_transform(ds.crs, "EPSG:4326", [cx], [cy])
                    lon, lat = float(xs[0]), float(ys[0])
    except ImageDecodeError:
        raise
    except (RasterioIOError, OSError, ValueError) as e:
        raise ImageDecodeError(f"unreadable TIFF: {e}") from e
    rgb = np.transpose(_scale_to_uint8(bands), (1, 2, 0))
    return Image.fromarray(np.ascontiguousarray(rgb)), ImageMeta(w, h, lon, lat)


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, ImageMeta]:
    """Decode one file to an RGB PIL image, or raise :class:`ImageDecodeError` with the reason."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ImageDecodeError(f"cannot read file: {e.strerror or e}") from e
    if size == 0:
        raise ImageDecodeError("empty file")
    if p.suffix.lower() in TIFF_EXTS:
        return _load_tiff(p, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageDecodeError(f"oversized image {w}x{h} > {max_pixels} pixels")
                im.load()  # forces a full decode: truncated files fail here
                rgb = im.convert("RGB")
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"oversized image (decompression bomb): {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError("not an image (unidentified format)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from e
    return rgb, ImageMeta(w, h)


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the archive root, with '/' separators
    size: int
    mtime_ns: int


def scan_folder(root: str | os.PathLike[str]) -> tuple[list[FileEntry], list[FileEntry]]:
    """(image candidates, other files), recursively, sorted; hidden files/dirs are ignored."""
    r = Path(root)
    if not r.exists():
        raise FileNotFoundError(f"archive folder not found: {r}")
    if not r.is_dir():
        raise NotADirectoryError(f"not a folder: {r}")
    images, others = [], []
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


def read_label_csv(path: str | os.PathLike[str]) -> dict[str, tuple[str | None, list[str]]]:
    """Labels per file from a CSV: a path column (path/image/file/filename) and either a
    label/class column or 0/1 columns, one per label (multi-label, e.g. UCM multilabels.csv)."""
    df = pd.read_csv(path)
    path_col = next((c for c in df.columns if c.lower() in ("path", "image", "file", "filename")), None)
    if path_col is None:
        raise ValueError(f"{path}: no path/image/file/filename column")
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
        raise ValueError(f"{path}: label columns must be 0/1 (or give a 'label' column)")
    names = np.array(label_cols, dtype=object)
    for p, row in zip(paths, mat.astype(bool), strict=True):
        out[p] = (None, names[row].tolist())
    return out


@dataclass
class BadFile:
    path: str
    reason: str


@dataclass
class IndexReport:
    """What one indexing run did; written as JSON into the store's reports/ folder."""

    root: str
    store: str
    scanned: int = 0
    already_indexed: int = 0
    embedded: int = 0
    bad: list[BadFile] = field(default_factory=list)
    ignored: list[BadFile] = field(default_factory=list)
    seconds: float = 0.0
    total_items: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"indexed {self.embedded} new/changed images in {self.seconds:.1f}s "
            f"({self.already_indexed} already indexed, {len(self.bad)} bad, "
            f"{len(self.ignored)} non-image files ignored); store now holds {self.total_items} items",
        ]
        if self.bad:
            lines.append("skipped files:")
            lines += [f"  {b.path}: {b.reason}" for b in self.bad[:50]]
            if len(self.bad) > 50:
                lines.append(f"  ... and {len(self.bad) - 50} more (see the report file)")
        return "\n".join(lines)


class _DecodeDataset:
    """Map-style dataset for torch's DataLoader: decode + preprocess, errors as values."""

    def __init__(self, root: Path, entries: list[FileEntry], preprocess: Callable[[Image.Image], Any], max_pixels: int):
        self.root = root
        self.entries = entries
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[int, Any, ImageMeta | None, str | None]:
        try:
            img, meta = load_image(self.root / self.entries[i].path, self.max_pixels)
            return i, self.preprocess(img), meta, None
        except ImageDecodeError as e:
            return i, None, None, str(e)
        except Exception as e:  # noqa: BLE001 - a worker must never die on one file
            return i, None, None, f"{type(e).__name__}: {e}"


def iter_decoded(
    root: Path,
    entries: list[FileEntry],
    preprocess: Callable[[Image.Image], Any],
    *,
    batch_size: int,
    num_workers: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[list[tuple[int, Any, ImageMeta | None, str | None]]]:
    """Batches of decoded items in order, decoded by ``num_workers`` processes."""
    from torch.utils.data import DataLoader

    ds = _DecodeDataset(root, entries, preprocess, max_pixels)
    if num_workers <= 0:
        for s in range(0, len(ds), batch_size):
            yield [ds[i] for i in range(s, min(s + batch_size, len(ds)))]
        return
    loader = DataLoader(
        ds,  # type: ignore[arg-type]
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
        prefetch_factor=4,
        persistent_workers=False,
    )
    yield from loader


def default_workers() -> int:
    """One decoding process per spare core: the main process needs a core for the model."""
    return max(1, min(8, (os.cpu_count() or 1) - 1))


def index_folder(
    folder: str | os.PathLike[str],
    store_dir: str | os.PathLike[str],
    encoder: Encoder,
    *,
    labels: str = "folder",
    labels_csv: str | os.PathLike[str] | None = None,
    dtype: str = "float16",
    batch_size: int = 64,
    num_workers: int | None = None,
    segment_size: int = 2048,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    compact: bool = True,
) -> IndexReport:
    """Index (or resume indexing) ``folder`` into the store at ``store_dir``.

    ``labels``: "folder" (class = parent folder name), "none", or "csv" with ``labels_csv``.
    Items are committed every ``segment_size`` images, so an interrupted run loses at most one
    segment of work and the next run picks up where it stopped.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    root = Path(folder).resolve()
    entries, others = scan_folder(root)
    label_map = read_label_csv(labels_csv) if labels_csv is not None else None
    if labels == "csv" and label_map is None:
        raise ValueError("labels='csv' needs labels_csv")
    # an already-open store-like object (e.g. rscir.pgstore.PgStore) is used as given
    store = (Store.open_or_create(store_dir, encoder.info, root, dtype=dtype)
             if isinstance(store_dir, str | os.PathLike) else store_dir)
    report = IndexReport(root=str(root), store=str(store.path), scanned=len(entries))
    report.ignored = [BadFile(o.path, f"not an image file type ({Path(o.path).suffix or 'no extension'})") for o in others]
    try:
        todo = _changed_entries(store, entries)
        report.already_indexed = len(entries) - len(todo)
        workers = default_workers() if num_workers is None else num_workers
        buf_emb: list[np.ndarray] = []
        buf_items: list[dict[str, Any]] = []
        bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress)

        def flush() -> None:
            if buf_items:
                store.add(np.concatenate(buf_emb), buf_items)
                report.embedded += len(buf_items)
                buf_emb.clear()
                buf_items.clear()

        for batch in iter_decoded(root, todo, encoder.preprocess, batch_size=batch_size,
                                  num_workers=workers, max_pixels=max_pixels):
            ok = [b for b in batch if b[3] is None]
            for i, _, _, reason in batch:
                if reason is not None:
                    report.bad.append(BadFile(todo[i].path, reason))
            if ok:
                emb = encoder.encode_preprocessed(encoder.collate([b[1] for b in ok]))
                buf_emb.append(emb)
                for (i, _, meta, _), _e in zip(ok, emb, strict=True):
                    buf_items.append(_item_record(todo[i], meta, labels, label_map))
            bar.update(len(batch))
            if len(buf_items) >= segment_size:
                flush()
        flush()
        bar.close()
        if compact:
            store.compact()
        report.total_items = len(store)
    finally:
        report.seconds = time.perf_counter() - t0
        _write_report(store, report)
        store.close()
    return report


def _changed_entries(store: Store, entries: list[FileEntry]) -> list[FileEntry]:
    """Entries whose (path, size, mtime) is not already in the store."""
    if not entries or len(store) == 0:
        return list(entries)
    cur = pd.DataFrame([asdict(e) for e in entries])
    have = store.items[["path", "size", "mtime_ns"]]
    merged = cur.merge(have, on=["path", "size", "mtime_ns"], how="left", indicator=True)
    keep = (merged["_merge"] == "left_only").to_numpy()
    return [e for e, k in zip(entries, keep, strict=True) if k]


def _item_record(
    e: FileEntry,
    meta: ImageMeta | None,
    labels: str,
    label_map: dict[str, tuple[str | None, list[str]]] | None,
) -> dict[str, Any]:
    label: str | None = None
    label_list: list[str] = []
    if labels == "folder":
        parent = Path(e.path).parent.name
        label = parent or None
        label_list = [label] if label else []
    if label_map is not None:
        hit = label_map.get(e.path) or label_map.get(Path(e.path).name)
        if hit is not None:
            csv_label, csv_labels = hit
            label = csv_label or label
            label_list = csv_labels or label_list
    m = meta or ImageMeta(-1, -1)
    return {
        "path": e.path, "size": e.size, "mtime_ns": e.mtime_ns, "width": m.width,
        "height": m.height, "label": label, "labels": label_list, "lon": m.lon, "lat": m.lat,
    }


def _write_report(store: Store, report: IndexReport) -> None:
    d = store.path / "reports"
    try:
        d.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (d / f"index-{stamp}-{os.getpid()}.json").write_text(json.dumps(report.to_dict(), indent=1))
        with open(d / "bad_files.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "reason"])
            for b in report.bad:
                w.writerow([b.path, b.reason])
    except OSError as e:  # the report is informative; never fail a finished index on it
        log.warning("could not write the index report: %s", e)
