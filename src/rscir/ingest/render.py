"""An item's image as search saw it: the chip (not its scene), the patch's RGB band stack, read
with the bands and scaling the store was indexed with — for thumbnails and contact sheets; and
an outside query file read as the store's all-band encoder reads its items."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import PathNotFoundError
from ..stores.base import EmbeddingStore
from .bigearthnet import patch_files
from .images import DEFAULT_MAX_PIXELS, decode_unit, load_image
from .rasters import RasterCache, read_unit
from .scenes import read_settings, read_sources
from .sensors import RasterRead
from .units import UnitTask, split_item_path


def item_image(store: EmbeddingStore, rel: str, max_pixels: int = DEFAULT_MAX_PIXELS
               ) -> Image.Image:
    """The RGB image of the item with path ``rel``.

    Raises :class:`~rscir.errors.PathNotFoundError` when the item has no file in the archive
    (e.g. imported embeddings), :class:`~rscir.errors.InvalidArgumentError` for a path outside
    the archive root, :class:`~rscir.errors.ImageDecodeError` when it cannot be decoded."""
    path = store.resolve_path(rel)  # refuses paths outside the root
    settings = read_settings(store)
    r = settings.get("read")
    read = RasterRead.from_dict(r) if isinstance(r, dict) else RasterRead()
    src, window = split_item_path(rel)
    root = Path(store.root).resolve()
    stacked = False
    files: tuple[str, ...] = (src.partition("#")[0],)
    if str(settings.get("archive", "")).startswith("bigearthnet") and path.is_dir():
        files, stacked = patch_files(src, settings.get("band_files")), True
    elif "#item=" in src:
        found = (read_sources(store).get(src) or {}).get("files")
        if not found:
            raise PathNotFoundError(f"the band files of {src!r} are not recorded in the store")
        files, stacked = tuple(found), True
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise PathNotFoundError(f"the item's file is missing from the archive: {missing[0]}")
    if window is None and not stacked:
        img, _ = load_image(path, max_pixels, read)
        return img
    cache = RasterCache(max_open=len(files), max_pixels=max_pixels)
    try:
        d = read_unit(root, UnitTask(files, window, stacked), read, cache, max_pixels)
    finally:
        cache.close()
    assert d.rgb is not None  # settings never ask for an all-band read
    return Image.fromarray(d.rgb)


def query_bands(store: EmbeddingStore, path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS
                ) -> Image.Image | np.ndarray:
    """A query file outside the archive as an all-band encoder (``classic-ms``) sees the store's
    items: every band as (C, H, W) reflectance, scaled with the store's sensor preset or
    stretch (a JPEG/PNG: its 3 bands / 255). Raises
    :class:`~rscir.errors.ImageDecodeError` when it cannot be decoded."""
    p = Path(path)
    r = read_settings(store).get("read")
    read = replace(RasterRead.from_dict(r) if isinstance(r, dict) else RasterRead(),
                   all_bands=True)
    cache = RasterCache(max_open=1, max_pixels=max_pixels)
    try:
        img, _, _ = decode_unit(p.parent, UnitTask((p.name,), None, False), read, cache,
                                max_pixels)
    finally:
        cache.close()
    assert img is not None  # a whole file is never skipped as an empty chip
    return img
