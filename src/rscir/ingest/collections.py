"""Precomputed embedding collections (GeoParquet) imported into a store, without re-encoding.

``rscir import FILE.parquet --store DIR --model NAME`` reads the file in row chunks
(``--chunk-rows``, default 65,536; memory is bounded by one chunk whatever the file's size) and
commits each chunk with the store's atomic ``add`` (so the archive moments are summed as for
any index, and an interrupted import resumes: rows whose item path is already in the store are
skipped). Vectors are L2-normalized, as rscir's encoders' are; rows with missing or non-finite
vectors are skipped and counted.

The named model embeds queries (images and texts) into the collection's space: it must be the
model the collection was made with (Major TOM Core-S2RGB-SigLIP: SigLIP-SO400M-384). rscir
checks the dimension and records the model in the store's manifest; it cannot check the weights
of vectors computed elsewhere, so name the right model.

Columns (:class:`ColumnMap`) default to the Major TOM embedding schema: ``embedding``,
``geometry`` (WGS84, GeoParquet WKB), ``timestamp``, ``grid_cell``, ``product_id``,
``centre_lon``/``centre_lat``, ``utm_crs``, ``utm_footprint`` (WKT in ``utm_crs``) and
``pixel_bbox`` (x0, y0, x1, y1 of the fragment in the product's cell). Other collections map
their columns, e.g. Clay v0 (``source_url, date, embeddings, geometry``)::

    --columns embedding=embeddings,datetime=date,path={source_url}#{date}

An imported item's path is a stable id, ``GRID_CELL/PRODUCT_ID#window=X0,Y0,W,H`` for Major TOM
(the chip notation of :mod:`.units`); there is usually no local image, so thumbnails answer 404
and the page shows the footprint and metadata.
"""

from __future__ import annotations

import json
import logging
import os
import string
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..encoders.base import ModelInfo
from ..errors import InvalidArgumentError, ModelMismatchError, PathNotFoundError
from ..stores.base import EmbeddingStore
from ..stores.uri import open_or_create_store

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class ColumnMap:
    """Which column of the file holds what (None: the file has no such column). ``path`` is a
    column name or a template of columns (``{grid_cell}/{product_id}``); ``window`` a column of
    pixel boxes (x0, y0, x1, y1) appended to the path as ``#window=X0,Y0,W,H``."""

    embedding: str = "embedding"
    path: str = "{grid_cell}/{product_id}"
    window: str | None = "pixel_bbox"
    geometry: str | None = "geometry"
    datetime: str | None = "timestamp"
    lon: str | None = "centre_lon"
    lat: str | None = "centre_lat"
    crs: str | None = "utm_crs"
    footprint_native: str | None = "utm_footprint"
    label: str | None = None
    labels: str | None = None

    @classmethod
    def parse(cls, spec: str | None, base: ColumnMap | None = None) -> ColumnMap:
        """``"embedding=embeddings,datetime=date,window="`` over ``base`` (Major TOM)."""
        m = base or cls()
        if not spec:
            return m
        names = {f.name for f in fields(cls)}
        upd: dict[str, str | None] = {}
        for part in _split_top(spec):
            k, sep, v = part.partition("=")
            k = k.strip()
            if not sep or k not in names:
                raise InvalidArgumentError(
                    f"--columns takes KEY=COLUMN pairs with KEY in {', '.join(sorted(names))}; "
                    f"got {part!r}")
            upd[k] = v.strip() or None
        if upd.get("embedding", m.embedding) is None or upd.get("path", m.path) is None:
            raise InvalidArgumentError("--columns: embedding and path cannot be empty")
        return replace(m, **upd)  # type: ignore[arg-type]

    def path_fields(self) -> list[str]:
        if "{" not in self.path:
            return [self.path]
        return [f for _, f, _, _ in string.Formatter().parse(self.path) if f]


def _split_top(spec: str) -> list[str]:
    """Split on commas outside ``{...}``."""
    out, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        out.append(cur)
    return out


@dataclass
class ImportReport:
    file: str
    store: str
    model: str
    rows: int = 0
    imported: int = 0
    already: int = 0
    skipped: int = 0  # missing / non-finite / zero vectors
    duplicates: int = 0  # rows whose path repeats an earlier row of the same chunk
    normalized: bool = False  # the file's vectors were not unit length
    seconds: float = 0.0
    total_items: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        s = (f"imported {self.imported} of {self.rows} rows in {self.seconds:.1f}s "
             f"({self.already} already in the store, {self.skipped} without a usable vector, "
             f"{self.duplicates} duplicate paths); store now holds {self.total_items} items "
             f"searchable with model {self.model!r}")
        return "\n".join([s, *self.notes])


# --------------------------------------------------------------------------- column readers
def _vectors(col: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 of a list column (nested lists flattened), and the rows that had one."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    ok = np.asarray(pc.is_valid(arr).to_numpy(zero_copy_only=False), bool)
    out = np.zeros((n, dim), np.float32)
    if not ok.any():
        return out, ok
    sub = arr.filter(pa.array(ok)) if not ok.all() else arr
    inner = None  # lengths of the innermost lists (a (1, d) array per row: d each)
    while pa.types.is_list(sub.type) or pa.types.is_large_list(sub.type) or \
            pa.types.is_fixed_size_list(sub.type):
        inner = np.asarray(pc.list_value_length(sub).to_numpy(zero_copy_only=False))
        sub = sub.flatten()
    if inner is None:
        raise InvalidArgumentError(f"the embedding column is not a list column ({arr.type})")
    vals = np.asarray(sub.to_numpy(zero_copy_only=False), np.float32)
    rows = int(ok.sum())
    if vals.size != rows * dim or (inner.size and (inner != inner[0]).any()):
        got = vals.size // max(rows, 1)
        raise ModelMismatchError(
            f"the file's vectors have {got} values, but the model embeds into dim {dim}: "
            "import with the model the collection was made with")
    out[ok] = vals.reshape(-1, dim)
    return out, ok


def _strings(col: Any) -> pd.Series:
    import pyarrow as pa

    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return pd.Series(col.to_pylist(), dtype=object)
    return pd.Series(col.to_pandas(), dtype=object).astype(str)


def _paths(batch: Any, cm: ColumnMap) -> pd.Series:
    """Item paths of a record batch: the template filled in, plus the pixel window."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "{" not in cm.path:
        s = pd.Series(pc.cast(batch.column(cm.path), pa.string()).to_pandas(), dtype=object)
    else:
        parts: list[Any] = []
        for lit, name, _, _ in string.Formatter().parse(cm.path):
            if lit:
                parts.append(pa.scalar(lit))
            if name:
                parts.append(pc.cast(batch.column(name), pa.string()))
        s = pd.Series(pc.binary_join_element_wise(*parts, "").to_pandas(), dtype=object)
    if cm.window and cm.window in batch.schema.names:
        col = batch.column(cm.window)
        flat = col
        while pa.types.is_list(flat.type) or pa.types.is_large_list(flat.type) or \
                pa.types.is_fixed_size_list(flat.type):
            flat = flat.flatten()
        box = np.asarray(flat.to_numpy(zero_copy_only=False))
        if box.size == 4 * len(s):
            b = pd.DataFrame(box.reshape(-1, 4).round().astype(np.int64))
            s = (s + "#window=" + b[0].astype(str) + "," + b[1].astype(str) + ","
                 + (b[2] - b[0]).astype(str) + "," + (b[3] - b[1]).astype(str))
    return s


def _times(col: Any) -> pd.Series:
    s = col.to_pandas()
    if pd.api.types.is_datetime64_any_dtype(s):
        return pd.to_datetime(s, utc=True)
    s = pd.Series(s, dtype=object).astype(str)
    t = pd.to_datetime(s, utc=True, errors="coerce", format="ISO8601")
    miss = t.isna()
    if miss.any():  # compact forms, e.g. 20200918T065631
        t[miss] = pd.to_datetime(s[miss], utc=True, errors="coerce", format="%Y%m%dT%H%M%S")
    return t


def _geometries(col: Any, crs: str | None) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """(lon, lat of centroids, WKB polygons in WGS84) of a WKB or WKT geometry column."""
    import pyarrow as pa
    import shapely

    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        geoms = shapely.from_wkt(np.asarray(col.to_pandas(), dtype=object))
    else:
        geoms = shapely.from_wkb(np.asarray(col.to_pylist(), dtype=object))
    if crs is not None:
        from pyproj import CRS, Transformer

        src = CRS.from_user_input(crs)
        if not src.equals(CRS.from_user_input("OGC:CRS84")) and src.to_epsg() != 4326:
            t = Transformer.from_crs(src, "OGC:CRS84", always_xy=True)
            geoms = shapely.transform(geoms, lambda xy: np.column_stack(t.transform(
                xy[:, 0], xy[:, 1])))
    c = shapely.centroid(geoms)
    return (np.asarray(shapely.get_x(c), np.float64), np.asarray(shapely.get_y(c), np.float64),
            list(shapely.to_wkb(geoms)))


def _geo_crs(pf: Any, column: str) -> str | None:
    """The CRS GeoParquet metadata declares for ``column`` (None: OGC:CRS84, the default)."""
    meta = pf.schema_arrow.metadata or {}
    raw = meta.get(b"geo")
    if not raw:
        return None
    try:
        crs = json.loads(raw)["columns"][column].get("crs")
    except (ValueError, KeyError, TypeError):
        return None
    if crs is None:
        return None
    return json.dumps(crs) if isinstance(crs, dict) else str(crs)


# --------------------------------------------------------------------------- import
def iter_chunks(file: str | os.PathLike[str], columns: list[str], chunk_rows: int
                ) -> Iterator[Any]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file)
    yield from pf.iter_batches(batch_size=chunk_rows, columns=columns)


def import_embeddings(
    file: str | os.PathLike[str],
    store: str | os.PathLike[str] | EmbeddingStore,
    model: ModelInfo,
    *,
    columns: ColumnMap | None = None,
    root: str | os.PathLike[str] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    dtype: str = "float16",
    progress: bool = True,
    compact: bool = True,
) -> ImportReport:
    """Import a GeoParquet embedding collection into ``store`` (created with ``model``).

    ``root``: the folder item paths are relative to (default: the file's folder), where local
    images of the items would be found for thumbnails."""
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    f = Path(file)
    if not f.is_file():
        raise PathNotFoundError(f"embedding file not found: {f}")
    if chunk_rows < 1:
        raise InvalidArgumentError("--chunk-rows must be >= 1")
    cm = columns or ColumnMap()
    pf = pq.ParquetFile(f)
    names = set(pf.schema_arrow.names)
    if cm.embedding not in names:
        raise InvalidArgumentError(
            f"{f}: no embedding column {cm.embedding!r} (columns: {', '.join(sorted(names))}); "
            "map it with --columns embedding=NAME")
    missing = [c for c in cm.path_fields() if c not in names]
    if missing:
        raise InvalidArgumentError(
            f"{f}: the item path needs columns {missing} (columns: {', '.join(sorted(names))});"
            " give --columns path=COLUMN or path={COL1}/{COL2}")
    opt = {k: getattr(cm, k) for k in ("window", "geometry", "datetime", "lon", "lat", "crs",
                                       "footprint_native", "label", "labels")}
    use = {k: v for k, v in opt.items() if v is not None and v in names}
    want = sorted({cm.embedding, *cm.path_fields(), *use.values()})
    geo_crs = _geo_crs(pf, use["geometry"]) if "geometry" in use else None
    st = store if isinstance(store, EmbeddingStore) else open_or_create_store(
        store, model, Path(root or f.parent).resolve(), dtype=dtype)
    owned = not isinstance(store, EmbeddingStore)
    if not owned:
        st.check_model(model)
    rep = ImportReport(str(f), st.location, model.name)
    try:
        have = pd.Index(st.files()["path"]) if len(st) else pd.Index([])
        bar = tqdm(total=pf.metadata.num_rows, desc="importing", unit="row", disable=not progress)
        try:
            for batch in iter_chunks(f, want, chunk_rows):
                _import_chunk(st, batch, cm, use, geo_crs, model.dim, have, rep)
                bar.update(batch.num_rows)
        finally:
            bar.close()
        if compact:
            st.compact()
        rep.total_items = len(st)
        _record(st, rep, cm, model)
    finally:
        rep.seconds = time.perf_counter() - t0
        if owned:
            st.close()
    return rep


def _import_chunk(st: EmbeddingStore, batch: Any, cm: ColumnMap, use: dict[str, str],
                  geo_crs: str | None, dim: int, have: pd.Index, rep: ImportReport) -> None:
    import shapely

    n = batch.num_rows
    rep.rows += n
    emb, ok = _vectors(batch.column(cm.embedding), dim)
    norms = np.linalg.norm(emb, axis=1)
    ok &= np.isfinite(emb).all(axis=1) & (norms > 0)
    if ok.any() and np.abs(norms[ok] - 1.0).max() > 1e-3:
        rep.normalized = True
    paths = _paths(batch, cm)
    dup = paths.duplicated().to_numpy()
    old = paths.isin(have).to_numpy() if len(have) else np.zeros(n, bool)
    rep.skipped += int((~ok).sum())
    rep.duplicates += int((dup & ok).sum())
    rep.already += int((old & ok & ~dup).sum())
    keep = ok & ~dup & ~old
    if not keep.any():
        return
    items = pd.DataFrame({"path": paths.to_numpy()[keep]})
    if "geometry" in use:
        lon, lat, wkb = _geometries(batch.column(use["geometry"]), geo_crs)
        items["footprint"] = np.asarray(wkb, dtype=object)[keep]
        items["lon"], items["lat"] = lon[keep], lat[keep]
    for k in ("lon", "lat"):
        if k in use:
            items[k] = np.asarray(batch.column(use[k]).to_numpy(zero_copy_only=False),
                                  np.float64)[keep]
    if "datetime" in use:
        items["datetime"] = _times(batch.column(use["datetime"])).to_numpy()[keep]
    if "crs" in use:
        items["crs"] = _strings(batch.column(use["crs"])).to_numpy()[keep]
    if "footprint_native" in use:
        col = batch.column(use["footprint_native"])
        vals = np.asarray(col.to_pylist(), dtype=object)[keep]
        items["footprint_native"] = (list(shapely.to_wkb(shapely.from_wkt(vals)))
                                     if isinstance(next(iter(vals), None), str) else list(vals))
    if "label" in use:
        items["label"] = _strings(batch.column(use["label"])).to_numpy()[keep]
    if "labels" in use:
        items["labels"] = list(_strings(batch.column(use["labels"])).to_numpy()[keep])
    vec = emb[keep]
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    st.add(vec, items)
    rep.imported += int(keep.sum())


def _record(st: EmbeddingStore, rep: ImportReport, cm: ColumnMap, model: ModelInfo) -> None:
    """``artifacts/ingest/settings.json`` (archive: import) and a report in ``reports/``."""
    d = st.artifact_dir("ingest")
    settings = d / "settings.json"
    if not settings.is_file():
        settings.write_text(json.dumps({"archive": "import", "read": None, "chip": None,
                                        "band_files": None}, indent=1))
    with open(d / "imports.jsonl", "a") as fh:
        fh.write(json.dumps({"file": rep.file, "columns": asdict(cm), "model": model.to_dict(),
                             "rows": rep.rows, "imported": rep.imported,
                             "time": time.time()}) + "\n")
    r = st.local_dir / "reports"
    try:
        r.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (r / f"import-{stamp}-{os.getpid()}.json").write_text(json.dumps(rep.to_dict(), indent=1))
    except OSError as e:
        log.warning("could not write the import report: %s", e)
