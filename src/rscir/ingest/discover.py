"""What an archive path is, and its sources: a folder of images and scenes, a BigEarthNet-S2
archive (v1 or v2), or a STAC catalog / ItemCollection file."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..encoders.base import BandLayout
from ..errors import ImageDecodeError, InvalidArgumentError, PathNotFoundError
from . import bigearthnet, stac
from .archive import scan_folder
from .rasters import RasterCache, href_of
from .sensors import S2_L2A, RasterRead
from .units import Source

ARCHIVE_KINDS = ("auto", "folder", "bigearthnet", "stac")


@dataclass
class Archive:
    """An archive's sources, what was left out and why, and how to read its pixels."""

    kind: str
    root: Path
    sources: list[Source]
    ignored: list[tuple[str, str]]
    read: RasterRead
    complete: Callable[[list[Source]], list[Source]] | None = None
    source_ids: dict[str, str] = field(default_factory=dict)  # source path -> archive's id
    band_files: tuple[str, ...] = ()  # BigEarthNet: the band files' names, for thumbnails


def discover(path: str | os.PathLike[str], kind: str, read: RasterRead, *, asset: str | None = None,
             bigearthnet_labels: int = 19, all_bands: bool = False) -> Archive:
    """The archive at ``path`` (``kind``: auto, folder, bigearthnet or stac). ``all_bands``:
    the encoder describes every band (BigEarthNet patches then stack all 12 band files)."""
    a = _discover(path, kind, read, asset=asset, bigearthnet_labels=bigearthnet_labels,
                  all_bands=all_bands)
    if all_bands:
        if a.read.bands is not None:
            raise InvalidArgumentError(
                f"--bands {','.join(map(str, a.read.bands))}: this model describes every band "
                "of a raster; drop --bands, or use an RGB model (e.g. --model classic) for a "
                "composite of chosen bands")
        a.read = replace(a.read, all_bands=True)
    return a


def _discover(path: str | os.PathLike[str], kind: str, read: RasterRead, *, asset: str | None,
              bigearthnet_labels: int, all_bands: bool) -> Archive:
    p = Path(path)
    if kind not in ARCHIVE_KINDS:
        raise InvalidArgumentError(f"--archive must be one of {', '.join(ARCHIVE_KINDS)}")
    if not p.exists():
        raise PathNotFoundError(f"archive folder not found: {p} (give a folder of images or "
                                "scenes, a BigEarthNet folder, or a STAC file)")
    p = p.resolve()
    if kind == "stac" or (kind == "auto" and p.is_file() and stac.is_stac_file(p)):
        if not p.is_file():
            raise InvalidArgumentError(f"{p}: give the STAC catalog or ItemCollection file")
        a = stac.scan(p, asset, read.bands if asset is None else None)
        if any(s.files for s in a.sources):  # band assets: the composite is their stack
            read = replace(read, bands=None)
        return Archive("stac", a.root, a.sources, a.ignored, read, None, a.ids)
    if asset is not None:
        raise InvalidArgumentError("--asset is for STAC catalogs and ItemCollections")
    version = bigearthnet.detect(p) if p.is_dir() and kind in ("auto", "bigearthnet") else None
    if kind == "bigearthnet" and version is None:
        raise InvalidArgumentError(
            f"{p} is not a BigEarthNet-S2 archive (v1: patch folders with "
            "<patch>_labels_metadata.json; v2: metadata.parquet and BigEarthNet-S2/)")
    if version is not None:
        if all_bands and read.bands is not None:
            raise InvalidArgumentError(
                "this model describes all 12 BigEarthNet bands; drop --bands")
        b = bigearthnet.scan(p, version, S2_L2A if all_bands else read.bands, bigearthnet_labels)
        # band files are named, not numbered: the composite is the stack of the files
        r = replace(read, bands=None, sensor=read.sensor or "sentinel2-l2a")
        ignored = [(m, "listed in the metadata but its band files are missing")
                   for m in b.missing]
        return Archive(f"bigearthnet-v{version}", p, b.sources, ignored, r, b.complete,
                       band_files=bigearthnet.band_names(read.bands))
    images, others = scan_folder(p)
    sources = [Source(e.path, e.size, e.mtime_ns) for e in images]
    ignored = [(e.path, f"not an image file type ({Path(e.path).suffix or 'no extension'})")
               for e in others]
    return Archive("folder", p, sources, ignored, read)


def band_layout(arch: Archive, max_pixels: int, tries: int = 20) -> BandLayout | None:
    """The bands an all-band encoder will see in ``arch``: those of its first readable source
    (a band stack's files, or a raster's non-alpha bands; 3 for JPEG/PNG), with red and NIR
    where the sensor preset or the band names say. None when no source is readable. Sources
    with another band count fail one by one (their reason says so)."""
    cache = RasterCache(max_open=1, max_pixels=max_pixels)
    try:
        for s in arch.sources[:tries]:
            if s.files:
                names: tuple[str | None, ...] = tuple(
                    Path(f).stem.rsplit("_", 1)[-1] for f in s.files
                ) if arch.kind.startswith("bigearthnet") else ()
                count = len(s.files)
            else:
                try:
                    r = cache.get(href_of(arch.root, s.path))
                except ImageDecodeError:
                    continue
                idx = arch.read.all_band_indexes(r.count, r.colorinterp)
                count = len(idx)
                names = tuple(r.descriptions[i - 1] for i in idx) if r.descriptions else ()
            red, nir = arch.read.spectral_positions(count, names)
            if red is None or nir is None:
                red = nir = None
            return BandLayout(count, red, nir)
    finally:
        cache.close()
    return None
