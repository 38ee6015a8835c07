"""The on-disk embedding store: append-only segments committed atomically.

Layout of a store directory::

    manifest.json                  model identity, dim, dtype, archive root, rscir version
    state.json                     live segments, next item id, generation (atomically replaced)
    segments/seg-000007/           embeddings.npy (N×d), items.parquet, moments.npz
    artifacts/<name>/              derived files (ANN indexes, text caches, ...)
    reports/                       ingestion reports

Why segments: a write becomes visible only when ``state.json`` is atomically replaced after the
segment directory is complete and renamed, so a process killed at any moment (even ``kill -9``)
leaves either the old or the new state, never a torn one; orphans are swept on the next write.
Re-adding a path supersedes the older row (newest segment wins) and keeps the item id stable.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._version import __version__
from ..encoders.base import ModelInfo
from ..errors import ModelMismatchError, StoreError
from ..moments import Moments

FORMAT_VERSION = 1
ITEM_COLUMNS = ("id", "path", "size", "mtime_ns", "width", "height", "label", "labels", "lon", "lat")
DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class Manifest:
    model: ModelInfo
    dim: int
    dtype: str
    root: str
    rscir_version: str = __version__
    format_version: int = FORMAT_VERSION
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        return cls(
            model=ModelInfo.from_dict(d["model"]),
            dim=int(d["dim"]),
            dtype=str(d["dtype"]),
            root=str(d["root"]),
            rscir_version=str(d.get("rscir_version", "?")),
            format_version=int(d.get("format_version", FORMAT_VERSION)),
            created=float(d.get("created", 0.0)),
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _empty_items() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=_ITEM_DTYPES[c]) for c in ITEM_COLUMNS})


_ITEM_DTYPES = {
    "id": "int64",
    "path": "object",
    "size": "int64",
    "mtime_ns": "int64",
    "width": "int64",
    "height": "int64",
    "label": "object",
    "labels": "object",
    "lon": "float64",
    "lat": "float64",
}


def normalize_items(items: pd.DataFrame | list[dict[str, Any]]) -> pd.DataFrame:
    """Coerce item metadata to the store's columns and dtypes (missing columns get defaults)."""
    df = pd.DataFrame(list(items)) if isinstance(items, list) else items.copy()
    n = len(df)
    if "path" not in df:
        raise ValueError("items need a 'path' column")
    defaults: dict[str, Any] = {
        "id": -1, "size": -1, "mtime_ns": -1, "width": -1, "height": -1,
        "label": None, "lon": np.nan, "lat": np.nan,
    }
    for col, val in defaults.items():
        if col not in df:
            df[col] = [val] * n
    if "labels" not in df:
        df["labels"] = [[] for _ in range(n)]
    df["labels"] = [list(v) if isinstance(v, list | tuple | np.ndarray) else [] for v in df["labels"]]
    df["label"] = [None if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v)
                   for v in df["label"]]
    df["path"] = df["path"].astype(str)
    for col in ("id", "size", "mtime_ns", "width", "height"):
        df[col] = pd.to_numeric(df[col]).fillna(-1).astype("int64")
    for col in ("lon", "lat"):
        df[col] = pd.to_numeric(df[col]).astype("float64")
    return df[list(ITEM_COLUMNS)].reset_index(drop=True)


class Store:
    """An embedding store directory (see module docstring). Read with :meth:`open`, make with
    :meth:`create`; ``writable`` stores hold an exclusive lock until :meth:`close`."""

    def __init__(self, path: Path, manifest: Manifest, *, writable: bool) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.writable = writable
        self._lock_fd: int | None = None
        if writable:
            self._acquire_lock()
            self._sweep_orphans()
        self._load()

    # ----------------------------------------------------------------- creation / opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        model: ModelInfo,
        root: str | os.PathLike[str],
        *,
        dtype: str = "float16",
    ) -> Store:
        """Make a new empty store (the directory may exist but must not hold a store)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        p = Path(path)
        if (p / "manifest.json").exists():
            raise StoreError(f"{p} already holds a store; open it instead")
        if p.exists() and not p.is_dir():
            raise StoreError(f"{p} exists and is not a directory")
        (p / "segments").mkdir(parents=True, exist_ok=True)
        manifest = Manifest(model=model, dim=model.dim, dtype=dtype, root=str(Path(root).resolve()))
        _atomic_write_json(p / "state.json", {"segments": [], "next_id": 0, "generation": 0})
        _atomic_write_json(p / "manifest.json", manifest.to_dict())  # written last: marks a store
        return cls(p, manifest, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False) -> Store:
        p = Path(path)
        mf = p / "manifest.json"
        if not p.is_dir():
            raise StoreError(f"no store at {p}: not a directory")
        if not mf.is_file():
            raise StoreError(f"no store at {p}: manifest.json is missing (run `rscir index` first)")
        try:
            manifest = Manifest.from_dict(json.loads(mf.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise StoreError(f"store manifest {mf} is unreadable: {e}") from e
        if manifest.format_version > FORMAT_VERSION:
            raise StoreError(
                f"store {p} has format {manifest.format_version}; this rscir reads up to "
                f"{FORMAT_VERSION} (upgrade rscir)"
            )
        return cls(p, manifest, writable=writable)

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike[str],
        model: ModelInfo,
        root: str | os.PathLike[str],
        *,
        dtype: str = "float16",
    ) -> Store:
        """Open for appending (checking model and root) or create if absent."""
        if (Path(path) / "manifest.json").exists():
            st = cls.open(path, writable=True)
            try:
                st.check_model(model)
                if Path(st.root).resolve() != Path(root).resolve():
                    raise StoreError(
                        f"store {path} indexes archive {st.root}, not {Path(root).resolve()}; "
                        "use another --store for another archive"
                    )
                if dtype != st.manifest.dtype:
                    raise StoreError(f"store {path} holds {st.manifest.dtype}, not {dtype}")
            except Exception:
                st.close()
                raise
            return st
        return cls.create(path, model, root, dtype=dtype)

    def check_model(self, model: ModelInfo) -> None:
        """Raise :class:`ModelMismatchError` unless ``model`` embeds into this store's space."""
        mine = self.manifest.model
        if not mine.same_space(model):
            raise ModelMismatchError(
                f"store {self.path} was built with model {mine.name!r} (arch {mine.arch}, "
                f"weights {mine.fingerprint[:19]}…, dim {mine.dim}), but model {model.name!r} "
                f"(arch {model.arch}, weights {model.fingerprint[:19]}…, dim {model.dim}) was "
                "given; use the same model or a new store"
            )

    # ----------------------------------------------------------------- locking / cleanup
    def _acquire_lock(self) -> None:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise StoreError(f"store {self.path} is being written by another process") from e
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()

    def _read_state(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"store state {self.path / 'state.json'} is unreadable: {e}") from e

    def _sweep_orphans(self) -> None:
        """Remove segments never committed to state.json (a writer died before committing)."""
        live = set(self._read_state()["segments"])
        seg_dir = self.path / "segments"
        for child in seg_dir.iterdir() if seg_dir.is_dir() else []:
            if child.name not in live:
                shutil.rmtree(child, ignore_errors=True)
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    # ----------------------------------------------------------------- reading
    def _load(self) -> None:
        state = self._read_state()
        self._state = state
        self._segments: list[str] = list(state["segments"])
        embs, frames, moms = [], [], []
        for name in self._segments:
            d = self.path / "segments" / name
            try:
                embs.append(np.load(d / "embeddings.npy", mmap_mode="r"))
                frames.append(pd.read_parquet(d / "items.parquet"))
                with np.load(d / "moments.npz") as m:
                    moms.append(Moments(int(m["n"]), m["sum"], m["sumsq"]))
            except (OSError, ValueError) as e:
                raise StoreError(f"segment {d} is damaged: {e}") from e
        dim = self.manifest.dim
        if frames:
            items = pd.concat(frames, ignore_index=True)
            items["labels"] = [list(v) if v is not None else [] for v in items["labels"]]
        else:
            items = _empty_items()
        # newest row of each path wins
        live = ~items["path"].duplicated(keep="last").to_numpy()
        self._all_rows = len(items)
        self._live_rows = np.flatnonzero(live)
        self._seg_embs = embs
        self._items = items.iloc[self._live_rows].reset_index(drop=True)
        self._emb_cache: np.ndarray | None = None
        total = Moments.zeros(dim)
        for m in moms:
            total = total + m
        dead = np.flatnonzero(~live)
        if dead.size:
            total = total - Moments.of(self._rows_of_all(dead))
        self._moments = total
        self._id_order = np.argsort(self._items["id"].to_numpy(), kind="stable")

    def _rows_of_all(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings of rows numbered over all segments (live or not)."""
        bounds = np.cumsum([0] + [e.shape[0] for e in self._seg_embs])
        out = np.empty((len(rows), self.manifest.dim), dtype=DTYPES[self.manifest.dtype])
        seg = np.searchsorted(bounds, rows, side="right") - 1
        for s in np.unique(seg):
            sel = seg == s
            out[sel] = self._seg_embs[s][rows[sel] - bounds[s]]
        return out

    def __len__(self) -> int:
        return len(self._items)

    @property
    def root(self) -> str:
        return self.manifest.root

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def generation(self) -> int:
        return int(self._state["generation"])

    @property
    def items(self) -> pd.DataFrame:
        return self._items

    @property
    def ids(self) -> np.ndarray:
        return self._items["id"].to_numpy()

    @property
    def embeddings(self) -> np.ndarray:
        """(N, d) live embeddings; a read-only memmap when the store is one clean segment."""
        if self._emb_cache is None:
            dt = DTYPES[self.manifest.dtype]
            if not self._seg_embs:
                self._emb_cache = np.zeros((0, self.dim), dtype=dt)
            elif len(self._seg_embs) == 1 and len(self._live_rows) == self._all_rows:
                self._emb_cache = self._seg_embs[0]
            else:
                self._emb_cache = self._rows_of_all(self._live_rows)
        return self._emb_cache

    def moments(self) -> Moments:
        return self._moments

    def rows_for_ids(self, ids: Any) -> np.ndarray:
        """Row positions of item ids; raises KeyError for unknown ids."""
        want = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        sorted_ids = self.ids[self._id_order]
        pos = np.searchsorted(sorted_ids, want)
        pos_c = np.minimum(pos, max(len(sorted_ids) - 1, 0))
        ok = (pos < len(sorted_ids)) & (sorted_ids[pos_c] == want) if len(sorted_ids) else pos < 0
        if not np.all(ok):
            raise KeyError(f"unknown item id(s): {want[~ok][:10].tolist()}")
        return self._id_order[pos_c]

    def items_for_ids(self, ids: Any) -> pd.DataFrame:
        """Metadata of these ids, in the order given (as :meth:`PgStore.items_for_ids`)."""
        return self.items.iloc[self.rows_for_ids(ids)].reset_index(drop=True)

    def rows_for_paths(self, paths: list[str]) -> np.ndarray:
        """Row of each relative path, -1 when absent."""
        index = pd.Index(self._items["path"])
        return index.get_indexer(pd.Index(paths)).astype(np.int64)

    def artifact_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad artifact name {name!r}")
        d = self.path / "artifacts" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def resolve_path(self, rel: str) -> Path:
        """Absolute path of an item's file, refusing anything outside the archive root."""
        root = Path(self.root).resolve()
        p = (root / rel).resolve()
        if p != root and root not in p.parents:
            raise ValueError(f"path {rel!r} is outside the archive root")
        return p

    # ----------------------------------------------------------------- writing
    def _require_writable(self) -> None:
        if not self.writable or self._lock_fd is None:
            raise StoreError(f"store {self.path} is open read-only")

    def _write_segment(self, emb: np.ndarray, items: pd.DataFrame) -> str:
        seg_root = self.path / "segments"
        tmp = seg_root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        with open(tmp / "embeddings.npy", "wb") as f:
            np.save(f, emb)
            f.flush()
            os.fsync(f.fileno())
        items.to_parquet(tmp / "items.parquet", index=False)
        m = Moments.of(emb)
        with open(tmp / "moments.npz", "wb") as f:
            np.savez(f, n=m.n, sum=m.sum, sumsq=m.sumsq)
            f.flush()
            os.fsync(f.fileno())
        for name in ("items.parquet",):
            fd = os.open(tmp / name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        gen = self.generation + 1
        name = f"seg-{gen:06d}-{uuid.uuid4().hex[:6]}"
        os.rename(tmp, seg_root / name)
        _fsync_dir(seg_root)
        return name

    def add(self, embeddings: np.ndarray, items: pd.DataFrame | list[dict[str, Any]]) -> np.ndarray:
        """Append rows atomically (one new segment); returns their item ids.

        A path already in the store is superseded and keeps its id; new paths get fresh ids.
        """
        self._require_writable()
        emb = np.asarray(embeddings)
        df = normalize_items(items)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (n, {self.dim}), got {emb.shape}")
        if len(df) != emb.shape[0]:
            raise ValueError(f"{emb.shape[0]} embeddings but {len(df)} items")
        if df["path"].duplicated().any():
            raise ValueError("duplicate paths within one add()")
        if not np.isfinite(emb).all():
            raise ValueError("embeddings contain NaN or inf")
        if len(df) == 0:
            return np.zeros(0, np.int64)
        existing = self.rows_for_paths(df["path"].tolist())
        ids = np.where(existing >= 0, self.ids[np.maximum(existing, 0)] if len(self) else -1, -1)
        fresh = ids < 0
        next_id = int(self._state["next_id"])
        ids[fresh] = np.arange(next_id, next_id + int(fresh.sum()))
        df["id"] = ids
        emb = emb.astype(DTYPES[self.manifest.dtype])
        name = self._write_segment(emb, df)
        state = {
            "segments": [*self._segments, name],
            "next_id": next_id + int(fresh.sum()),
            "generation": self.generation + 1,
        }
        _atomic_write_json(self.path / "state.json", state)
        self._load()
        return ids

    def compact(self) -> None:
        """Rewrite the live rows as one segment (memmap-able, no superseded rows)."""
        self._require_writable()
        if len(self._segments) <= 1 and len(self._live_rows) == self._all_rows:
            return
        emb = np.ascontiguousarray(self.embeddings)
        name = self._write_segment(emb, self._items)
        old = list(self._segments)
        state = {
            "segments": [name],
            "next_id": int(self._state["next_id"]),
            "generation": self.generation + 1,
        }
        _atomic_write_json(self.path / "state.json", state)
        for o in old:
            shutil.rmtree(self.path / "segments" / o, ignore_errors=True)
        self._load()

    def info(self) -> dict[str, Any]:
        """A summary for `rscir info` and the HTTP API."""
        labels = self._items["label"].dropna()
        return {
            "path": str(self.path),
            "root": self.root,
            "items": len(self),
            "dim": self.dim,
            "dtype": self.manifest.dtype,
            "segments": len(self._segments),
            "generation": self.generation,
            "model": self.manifest.model.to_dict(),
            "rscir_version": self.manifest.rscir_version,
            "classes": int(labels.nunique()),
            "georeferenced": int(self._items["lon"].notna().sum()),
        }
