"""The directory store: append-only segments committed atomically.

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
Embeddings are memory-mapped for reading, so search scans them without loading the archive.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ..encoders.base import ModelInfo
from ..errors import StoreError, StoreLockedError, UnknownItemError
from ..moments import Moments
from .base import EmbeddingStore
from .schema import DTYPES, FORMAT_VERSION, Manifest, check_dtype, empty_items


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


class DirectoryStore(EmbeddingStore):
    """An embedding store in a directory (see module docstring). Read with :meth:`open`, make
    with :meth:`create`; ``writable`` stores hold an exclusive lock until :meth:`close`."""

    backend: ClassVar[str] = "embedded"  # the name the HTTP API and `rscir info` report

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
    def exists(cls, location: str | os.PathLike[str]) -> bool:
        return (Path(location) / "manifest.json").is_file()

    @classmethod
    def create(cls, location: str | os.PathLike[str], model: ModelInfo,
               root: str | os.PathLike[str], *, dtype: str = "float16") -> DirectoryStore:
        """Make a new empty store (the directory may exist but must not hold a store)."""
        check_dtype(dtype)
        p = Path(location)
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
    def open(cls, location: str | os.PathLike[str], *, writable: bool = False) -> DirectoryStore:
        p = Path(location)
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
                f"{FORMAT_VERSION} (upgrade rscir)")
        return cls(p, manifest, writable=writable)

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def local_dir(self) -> Path:
        return self.path

    # ----------------------------------------------------------------- locking / cleanup
    def _acquire_lock(self) -> None:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise StoreLockedError(f"store {self.path} is being written by another process") from e
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()

    def _read_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads((self.path / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"store state {self.path / 'state.json'} is unreadable: {e}") from e
        return state

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
        if frames:
            items = pd.concat(frames, ignore_index=True)
            items["labels"] = [list(v) if v is not None else [] for v in items["labels"]]
        else:
            items = empty_items()
        # newest row of each path wins
        live = ~items["path"].duplicated(keep="last").to_numpy()
        self._all_rows = len(items)
        self._live_rows = np.flatnonzero(live)
        self._seg_embs = embs
        self._items = items.iloc[self._live_rows].reset_index(drop=True)
        self._emb_cache: np.ndarray | None = None
        total = Moments.zeros(self.dim)
        for m in moms:
            total = total + m
        dead = np.flatnonzero(~live)
        if dead.size:
            total = total - Moments.of(self._rows_of_all(dead))
        self._moments = total
        self._id_order = np.argsort(self._items["id"].to_numpy(), kind="stable")
        self._path_index = pd.Index(self._items["path"])

    def refresh(self) -> bool:
        """Reload when another process committed (a newer generation in state.json)."""
        if self.writable:
            return False  # the only writer: nothing else can have changed the store
        try:
            gen = int(self._read_state()["generation"])
        except (StoreError, KeyError, TypeError, ValueError):
            return False
        if gen == self.generation:
            return False
        self._load()
        return True

    def _rows_of_all(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings of rows numbered over all segments (live or not)."""
        bounds = np.cumsum([0] + [e.shape[0] for e in self._seg_embs])
        out = np.empty((len(rows), self.dim), dtype=DTYPES[self.dtype])
        seg = np.searchsorted(bounds, rows, side="right") - 1
        for s in np.unique(seg):
            sel = seg == s
            out[sel] = self._seg_embs[s][rows[sel] - bounds[s]]
        return out

    def __len__(self) -> int:
        return len(self._items)

    @property
    def generation(self) -> int:
        return int(self._state["generation"])

    @property
    def items(self) -> pd.DataFrame:
        return self._items

    @property
    def embeddings(self) -> np.ndarray:
        """(N, d) live embeddings; a read-only memmap when the store is one clean segment."""
        if self._emb_cache is None:
            dt = DTYPES[self.dtype]
            if not self._seg_embs:
                self._emb_cache = np.zeros((0, self.dim), dtype=dt)
            elif len(self._seg_embs) == 1 and len(self._live_rows) == self._all_rows:
                self._emb_cache = self._seg_embs[0]
            else:
                self._emb_cache = self._rows_of_all(self._live_rows)
        return self._emb_cache

    def moments(self) -> Moments:
        return self._moments

    def rows_for_ids(self, ids: Any, *, strict: bool = True) -> np.ndarray:
        """Row positions (in ``items``/``embeddings``) of item ids; an unknown id raises
        :class:`UnknownItemError`, or gives -1 when not ``strict``."""
        want = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        sorted_ids = self.ids[self._id_order]
        pos = np.searchsorted(sorted_ids, want)
        pos_c = np.minimum(pos, max(len(sorted_ids) - 1, 0))
        ok = (pos < len(sorted_ids)) & (sorted_ids[pos_c] == want) if len(sorted_ids) else pos < 0
        if strict and not np.all(ok):
            raise UnknownItemError(f"unknown item id(s): {want[~ok][:10].tolist()}")
        rows = self._id_order[pos_c] if len(sorted_ids) else np.zeros(len(want), np.int64)
        return np.where(ok, rows, -1).astype(np.int64)

    def items_for_ids(self, ids: Sequence[int] | np.ndarray) -> pd.DataFrame:
        return self.items.iloc[self.rows_for_ids(ids)].reset_index(drop=True)

    def vectors_for_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = self.rows_for_ids(ids)
        return np.asarray(self.embeddings[rows], np.float32)

    def rows_for_paths(self, paths: list[str]) -> np.ndarray:
        """Row of each relative path, -1 when absent."""
        return np.asarray(self._path_index.get_indexer(pd.Index(paths)), np.int64)

    def id_of_file(self, rel: str, size: int, mtime_ns: int) -> int | None:
        row = int(self.rows_for_paths([rel])[0])
        if row < 0:
            return None
        item = self._items.iloc[row]
        if int(item["size"]) != size or int(item["mtime_ns"]) != mtime_ns:
            return None  # a changed file on disk is not the indexed one
        return int(item["id"])

    def _info_extra(self) -> dict[str, Any]:
        return {"segments": len(self._segments)}

    # ----------------------------------------------------------------- writing
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
        fd = os.open(tmp / "items.parquet", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        gen = self.generation + 1
        name = f"seg-{gen:06d}-{uuid.uuid4().hex[:6]}"
        os.rename(tmp, seg_root / name)
        _fsync_dir(seg_root)
        return name

    def _require_writable(self) -> None:
        if not self.writable or self._lock_fd is None:
            raise StoreError(f"store {self.path} is open read-only")

    def _add(self, embeddings: np.ndarray, items: pd.DataFrame) -> np.ndarray:
        existing = self.rows_for_paths(items["path"].tolist())
        ids = np.where(existing >= 0, self.ids[np.maximum(existing, 0)] if len(self) else -1, -1)
        fresh = ids < 0
        next_id = int(self._state["next_id"])
        ids[fresh] = np.arange(next_id, next_id + int(fresh.sum()))
        items = items.assign(id=ids)
        name = self._write_segment(embeddings, items)
        state = {
            "segments": [*self._segments, name],
            "next_id": next_id + int(fresh.sum()),
            "generation": self.generation + 1,
        }
        _atomic_write_json(self.path / "state.json", state)
        self._load()
        return np.asarray(ids, np.int64)

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
