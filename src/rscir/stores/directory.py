"""The directory store: append-only segments committed atomically, checked on every open.

Layout of a store directory::

    manifest.json           model identity, dim, dtype, archive root, rscir version
    state.json              live segments (rows, size and SHA-256 of every file), next item id,
                            generation, segments retired by the last compaction, a copy of the
                            manifest (atomically replaced: the one commit point)
    segments/seg-000007-…/  embeddings.npy (N×d), items.parquet, moments.npz, segment.json
    quarantine/             what a writer or ``rscir repair`` set aside, each with a note
    artifacts/<name>/       derived files (ANN indexes, caches)
    reports/                ingestion reports

Why segments: a write becomes visible only when ``state.json`` is atomically replaced after the
segment folder is complete, checksummed and renamed, so a process killed at any moment (even
``kill -9``) leaves either the old or the new state, never a torn one. Re-adding a path
supersedes the older row (newest segment wins) and keeps the item id stable. Embeddings are
memory-mapped for reading, so search scans them without loading the archive.

Nothing is ever deleted on doubt: a writer (holding the lock, with a state that parses and
checks) moves folders no commit reached to ``quarantine/``; a segment folder that the state does
not list but should (its generation is not newer than the state's) means damage, and the store
then refuses to write and says to run ``rscir verify`` / ``rscir repair``. Only the segments a
compaction retired, which the new state names, are removed. Readers that find a segment gone
because a compaction committed meanwhile re-read the state instead of calling it damaged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import threading
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ..encoders.base import ModelInfo
from ..errors import (
    StoreDamagedError,
    StoreError,
    StoreExistsError,
    StoreLockedError,
    UnknownItemError,
)
from ..moments import Moments
from .base import EmbeddingStore
from .integrity import (
    FileRecord,
    Problem,
    RepairReport,
    VerifyReport,
    purge_quarantine,
    quarantine,
    sha256_file,
)
from .schema import (
    DTYPES,
    FORMAT_VERSION,
    ITEM_COLUMNS,
    REQUIRED_COLUMNS,
    Manifest,
    check_dtype,
    empty_items,
    normalize_items,
)

STATE_FORMAT = 2  # 1: segments as bare names, no checksums (read, upgraded by the next writer)
SEGMENT_FILES = ("embeddings.npy", "items.parquet", "moments.npz")
_SEG_RE = re.compile(r"^seg-(\d{6,})-[0-9a-f]+$")
_OPEN_RETRIES = 8


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
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


def segment_generation(name: str) -> int | None:
    m = _SEG_RE.match(name)
    return int(m.group(1)) if m else None


def _fix(path: Path) -> str:
    return f"run `rscir verify {path}`, then `rscir repair {path}`"


class _Vanished(Exception):
    """A segment file listed in the state is missing (maybe a concurrent compaction)."""


@dataclass(frozen=True)
class SegmentRecord:
    """A live segment as the state records it (``files`` is None in format-1 stores)."""

    name: str
    rows: int
    files: dict[str, FileRecord] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows,
                "files": None if self.files is None else
                {k: {"bytes": v.bytes, "sha256": v.sha256} for k, v in self.files.items()}}


@dataclass
class State:
    """The commit point of a directory store (``state.json``), parsed and checked."""

    segments: list[SegmentRecord]
    next_id: int
    generation: int
    retired: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    format: int = STATE_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "segments": [s.to_dict() for s in self.segments],
                "next_id": self.next_id, "generation": self.generation, "retired": self.retired,
                "manifest": self.manifest}

    @classmethod
    def parse(cls, obj: Any, where: Path) -> State:
        """A state from JSON, or :class:`StoreDamagedError` saying what is wrong."""
        def bad(what: str) -> StoreDamagedError:
            return StoreDamagedError(f"store state {where / 'state.json'} is damaged: {what}; "
                                     f"{_fix(where)}")

        if not isinstance(obj, dict):
            raise bad(f"expected a JSON object, found {type(obj).__name__}")
        for key in ("segments", "next_id", "generation"):
            if key not in obj:
                raise bad(f"'{key}' is missing")
        if not isinstance(obj["segments"], list):
            raise bad("'segments' is not a list")
        for key in ("next_id", "generation"):
            v = obj[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(f"'{key}' is not a non-negative integer ({v!r})")
        fmt = int(obj.get("format", 1))
        if fmt > STATE_FORMAT:
            raise StoreError(f"store {where} has state format {fmt}; this rscir reads up to "
                             f"{STATE_FORMAT} (upgrade rscir)")
        segs: list[SegmentRecord] = []
        for e in obj["segments"]:
            if isinstance(e, str) and fmt == 1:
                segs.append(SegmentRecord(e, -1, None))
                continue
            try:
                files = None if e.get("files") is None else {
                    str(k): FileRecord(int(v["bytes"]), str(v["sha256"]))
                    for k, v in e["files"].items()}
                rec = SegmentRecord(str(e["name"]), int(e["rows"]), files)
            except (AttributeError, KeyError, TypeError, ValueError) as err:
                raise bad(f"segment entry {e!r} is malformed ({err})") from None
            segs.append(rec)
        for rec in segs:
            g = segment_generation(rec.name)
            if g is None or g > obj["generation"]:
                raise bad(f"segment name {rec.name!r} does not fit generation {obj['generation']}")
        names = [s.name for s in segs]
        if len(set(names)) != len(names):
            raise bad("a segment is listed twice")
        retired = obj.get("retired") or []
        if not isinstance(retired, list) or not all(isinstance(r, str) for r in retired):
            raise bad("'retired' is not a list of names")
        manifest = obj.get("manifest")
        return cls(segs, int(obj["next_id"]), int(obj["generation"]), list(retired),
                   manifest if isinstance(manifest, dict) else None, fmt)


@dataclass
class _Lookups:
    """Read-side lookups of one store generation, replaced as a whole by a reload (so a search
    running meanwhile sees one generation): ids, the id -> row search arrays, the metadata
    columns as arrays (taking a few rows from them costs no DataFrame), and the float32 copy
    of the embeddings that exact scans read (made on first use, when it fits the budget)."""

    items: pd.DataFrame
    ids: np.ndarray  # (N,) int64, items order
    order: np.ndarray  # argsort of ids
    sorted_ids: np.ndarray  # ids[order]
    columns: dict[str, Any] = field(default_factory=dict)
    scan: np.ndarray | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def rows(self, ids: Any, strict: bool = True) -> np.ndarray:
        want = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        n = len(self.sorted_ids)
        if not n:
            if strict and want.size:
                raise UnknownItemError(f"unknown item id(s): {want[:10].tolist()}")
            return np.full(len(want), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.sorted_ids, want), n - 1)
        ok = self.sorted_ids[pos] == want
        if strict and not ok.all():
            raise UnknownItemError(f"unknown item id(s): {want[~ok][:10].tolist()}")
        return np.where(ok, self.order[pos], -1).astype(np.int64, copy=False)


@dataclass
class _Loaded:
    """One consistent read of the segments a state lists."""

    state: State
    embs: list[np.ndarray]
    items: pd.DataFrame
    moments: list[Moments]


class DirectoryStore(EmbeddingStore):
    """An embedding store in a directory (see module docstring). Read with :meth:`open`, make
    with :meth:`create`; ``writable`` stores hold an exclusive lock until :meth:`close`."""

    backend: ClassVar[str] = "embedded"  # the name the HTTP API and `rscir info` report
    # float16 stores keep a float32 copy for exact scans when it is at most this big (the
    # float16 -> float32 conversion costs several times the matrix product it feeds)
    SCAN_CACHE_BYTES: ClassVar[int] = 256 << 20

    def __init__(self, path: Path, manifest: Manifest, *, writable: bool,
                 lock_fd: int | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.writable = writable
        self._lock_fd = lock_fd
        try:
            if writable and lock_fd is None:
                self._lock_fd = _lock(self.path, "written")
            self._load()
            if writable:
                self._sweep()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- creation / opening
    @classmethod
    def exists(cls, location: str | os.PathLike[str]) -> bool:
        """True when the folder holds a store; False when it holds none (or is absent); a
        folder with store data but no manifest is damage, never "absent"."""
        p = Path(location)
        if (p / "manifest.json").is_file():
            return True
        if _holds_data(p):
            raise StoreDamagedError(
                f"{p} holds store data (segments or state.json) but its manifest.json is "
                f"missing or unreadable; nothing was changed — {_fix(p)}")
        return False

    @classmethod
    def create(cls, location: str | os.PathLike[str], model: ModelInfo,
               root: str | os.PathLike[str], *, dtype: str = "float16") -> DirectoryStore:
        """Make a new empty store. The lock is taken first, so of two processes creating the
        same store one creates it and the other is told so (nothing is overwritten)."""
        check_dtype(dtype)
        p = Path(location)
        if p.exists() and not p.is_dir():
            raise StoreError(f"{p} exists and is not a directory")
        p.mkdir(parents=True, exist_ok=True)
        fd = _lock(p, "created")
        try:
            if (p / "manifest.json").exists():
                raise StoreExistsError(f"{p} already holds a store; open it instead")
            if _holds_data(p):
                raise StoreDamagedError(
                    f"{p} holds store data but no manifest.json; nothing was changed — {_fix(p)}")
            manifest = Manifest(model=model, dim=model.dim, dtype=dtype,
                                root=str(Path(root).resolve()))
            (p / "segments").mkdir(exist_ok=True)
            state = State([], 0, 0, [], manifest.to_dict())
            _atomic_write_json(p / "state.json", state.to_dict())
            _atomic_write_json(p / "manifest.json", manifest.to_dict())  # last: marks a store
            return cls(p, manifest, writable=True, lock_fd=fd)
        except BaseException:
            _unlock(fd)
            raise

    @classmethod
    def open(cls, location: str | os.PathLike[str], *, writable: bool = False) -> DirectoryStore:
        p = Path(location)
        if not p.is_dir():
            raise StoreError(f"no store at {p}: not a directory")
        mf = p / "manifest.json"
        if not mf.is_file():
            if _holds_data(p):
                raise StoreDamagedError(
                    f"{p}: manifest.json is missing but the folder holds store data; {_fix(p)}")
            raise StoreError(f"no store at {p}: manifest.json is missing (run `rscir index` first)")
        try:
            manifest = Manifest.from_dict(json.loads(mf.read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError,
                AttributeError) as e:
            raise StoreDamagedError(f"store manifest {mf} is unreadable ({e}); {_fix(p)}") from e
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

    def close(self) -> None:
        if self._lock_fd is not None:
            _unlock(self._lock_fd)
            self._lock_fd = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()

    # ----------------------------------------------------------------- state and segments
    def _read_state(self) -> State:
        f = self.path / "state.json"
        try:
            obj = json.loads(f.read_text())
        except FileNotFoundError:
            raise StoreDamagedError(f"store state {f} is missing; {_fix(self.path)}") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreDamagedError(f"store state {f} is unreadable ({e}); "
                                    f"{_fix(self.path)}") from e
        return State.parse(obj, self.path)

    def _load(self) -> None:
        """Read the state and every segment it lists, checking sizes, shapes and counts;
        retried when a concurrent compaction replaced a segment while we read."""
        for _ in range(_OPEN_RETRIES):
            state = self._read_state()
            try:
                loaded = self._read_segments(state)
            except _Vanished as e:
                if not self.writable and self._read_state().generation != state.generation:
                    continue  # a newer commit replaced it: read that one
                raise StoreDamagedError(f"{e}; {_fix(self.path)}") from None
            self._check_unlisted(state)
            self._install(loaded)
            return
        raise StoreError(f"store {self.path} changed {_OPEN_RETRIES} times while being opened; "
                         "try again when the writer is done")

    def _check_unlisted(self, state: State) -> None:
        """Segment folders the state should list but does not: damage, never ignored."""
        listed = {s.name for s in state.segments} | set(state.retired)
        for name in _segment_dirs(self.path):
            g = segment_generation(name)
            if name not in listed and g is not None and g <= state.generation:
                raise StoreDamagedError(
                    f"segment folder segments/{name} is not listed in state.json (generation "
                    f"{state.generation}); nothing was changed — {_fix(self.path)}")

    def _read_segments(self, state: State) -> _Loaded:
        embs, frames, moms = [], [], []
        for rec in state.segments:
            e, df, m = self._read_segment(rec)
            embs.append(e)
            frames.append(df)
            moms.append(m)
        if frames:
            items = pd.concat(frames, ignore_index=True)
            items["labels"] = [list(v) if v is not None else [] for v in items["labels"]]
        else:
            items = empty_items()
        return _Loaded(state, embs, items, moms)

    def _read_segment(self, rec: SegmentRecord, *, full: bool = False,
                      ) -> tuple[np.ndarray, pd.DataFrame, Moments]:
        """One segment, with the cheap checks (and the checksums when ``full``)."""
        d = self.path / "segments" / rec.name
        where = f"segment {rec.name}"
        for fname in SEGMENT_FILES:
            f = d / fname
            if not f.is_file():
                raise _Vanished(f"{where}: {fname} is missing")
            if rec.files is not None and fname in rec.files:
                want = rec.files[fname]
                size = f.stat().st_size
                if size != want.bytes:
                    raise StoreDamagedError(
                        f"{where}: {fname} has {size} bytes, the store recorded {want.bytes}; "
                        f"{_fix(self.path)}")
                if (full or fname == "moments.npz") and sha256_file(f) != want.sha256:
                    raise StoreDamagedError(
                        f"{where}: {fname} does not match its recorded checksum (changed or "
                        f"corrupted on disk); {_fix(self.path)}")
        try:
            emb = np.load(d / "embeddings.npy", mmap_mode="r")
        except FileNotFoundError:
            raise _Vanished(f"{where}: embeddings.npy is missing") from None
        except (OSError, ValueError, EOFError) as e:
            raise StoreDamagedError(f"{where}: embeddings.npy is unreadable ({e or 'empty'}); "
                                    f"{_fix(self.path)}") from e
        dt = DTYPES[self.dtype]
        if emb.ndim != 2 or emb.shape[1] != self.dim or emb.dtype != dt:
            raise StoreDamagedError(
                f"{where}: embeddings.npy holds {emb.dtype} {emb.shape}, the store holds "
                f"{self.dtype} (n, {self.dim}); {_fix(self.path)}")
        try:
            df = pd.read_parquet(d / "items.parquet")
        except FileNotFoundError:
            raise _Vanished(f"{where}: items.parquet is missing") from None
        except Exception as e:  # noqa: BLE001 - any parse failure of the file is damage
            raise StoreDamagedError(f"{where}: items.parquet is unreadable ({e}); "
                                    f"{_fix(self.path)}") from e
        missing = [c for c in REQUIRED_COLUMNS if c not in df]
        if missing:
            raise StoreDamagedError(f"{where}: items.parquet lacks columns {missing}; "
                                    f"{_fix(self.path)}")
        if any(c not in df for c in ITEM_COLUMNS):  # written by an older rscir: fill defaults
            df = normalize_items(df)
        try:
            with np.load(d / "moments.npz") as z:
                m = Moments(int(z["n"]), np.asarray(z["sum"], np.float64),
                            np.asarray(z["sumsq"], np.float64))
        except FileNotFoundError:
            raise _Vanished(f"{where}: moments.npz is missing") from None
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise StoreDamagedError(f"{where}: moments.npz is unreadable ({e}); "
                                    f"{_fix(self.path)}") from e
        rows = emb.shape[0]
        if rec.rows >= 0 and rows != rec.rows:
            raise StoreDamagedError(f"{where}: embeddings.npy has {rows} rows, the store "
                                    f"recorded {rec.rows}; {_fix(self.path)}")
        if len(df) != rows:
            raise StoreDamagedError(f"{where}: items.parquet has {len(df)} rows but "
                                    f"embeddings.npy has {rows}; {_fix(self.path)}")
        if (m.n != rows or m.sum.shape != (self.dim,) or m.sumsq.shape != (self.dim, self.dim)
                or not (np.isfinite(m.sum).all() and np.isfinite(m.sumsq).all())):
            raise StoreDamagedError(f"{where}: moments.npz does not describe its {rows} rows "
                                    f"(n={m.n}); {_fix(self.path)}")
        return emb, df, m

    def _install(self, loaded: _Loaded) -> None:
        state, items = loaded.state, loaded.items
        # newest row of each path wins
        live = ~items["path"].duplicated(keep="last").to_numpy()
        ids = items["id"].to_numpy()[live]
        if len(ids) and (ids.min() < 0 or ids.max() >= state.next_id
                         or len(np.unique(ids)) != len(ids)):
            raise StoreDamagedError(
                f"store {self.path}: item ids are not unique or not below next_id "
                f"{state.next_id}; {_fix(self.path)}")
        self._state = state
        self._segments = [s.name for s in state.segments]
        self._all_rows = len(items)
        self._live_rows = np.flatnonzero(live)
        self._seg_embs = loaded.embs
        self._items = items.iloc[self._live_rows].reset_index(drop=True)
        self._emb_cache: np.ndarray | None = None
        total = Moments.zeros(self.dim)
        for m in loaded.moments:
            total = total + m
        dead = np.flatnonzero(~live)
        if dead.size:
            total = total - Moments.of(self._rows_of_all(dead))
        self._moments = total
        ids = self._items["id"].to_numpy(np.int64, copy=True)
        ids.flags.writeable = False
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        sorted_ids.flags.writeable = False
        self._lookups = _Lookups(self._items, ids, order, sorted_ids)
        self._path_index = pd.Index(self._items["path"])

    def _sweep(self) -> None:
        """As the writer, with a state that checked out: set aside what no commit reached
        (quarantine), remove only what the last compaction retired."""
        state = self._state
        seg_root = self.path / "segments"
        seg_root.mkdir(exist_ok=True)
        listed = {s.name for s in state.segments}
        for name in _segment_dirs(self.path, hidden=True):
            d = seg_root / name
            if name in listed:
                continue
            if name in state.retired:
                shutil.rmtree(d, ignore_errors=True)  # replaced by a committed compaction
            elif name.startswith(".tmp-"):
                quarantine(self.path, d, "an unfinished segment of a writer that stopped "
                           "before renaming it (never committed)")
            else:  # newer than the state (checked on load): written, never committed
                quarantine(self.path, d, f"a segment newer than the committed state (generation "
                           f"{state.generation}): its writer stopped before committing it")
        for tmp in self.path.glob(".*.tmp"):
            quarantine(self.path, tmp, "a half-written state or manifest file (never committed)")

    # ----------------------------------------------------------------- reading
    def refresh(self) -> bool:
        """Reload when another process committed (a newer generation in state.json)."""
        if self.writable:
            return False  # the only writer: nothing else can have changed the store
        try:
            gen = self._read_state().generation
        except StoreError:
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
        return self._state.generation

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

    @property
    def ids(self) -> np.ndarray:
        """Item ids in ``items`` order (read-only, kept per generation)."""
        return self._lookups.ids

    @property
    def scan_embeddings(self) -> np.ndarray:
        """``embeddings`` as float32 when they fit ``SCAN_CACHE_BYTES``: converted once per
        generation rather than a chunk per query (equal values: float16 -> float32 is exact);
        else the memmap itself."""
        lk = self._lookups
        if lk.scan is not None:
            return lk.scan
        x = self.embeddings
        if (x.dtype == np.float32 or x.shape[0] * x.shape[1] * 4 > self.SCAN_CACHE_BYTES
                or lk is not self._lookups):  # (a reload meanwhile: not cached for the old one)
            return x
        with lk.lock:
            if lk.scan is None:
                scan = np.ascontiguousarray(x, dtype=np.float32)
                scan.flags.writeable = False
                lk.scan = scan
        return lk.scan

    def rows_for_ids(self, ids: Any, *, strict: bool = True) -> np.ndarray:
        """Row positions (in ``items``/``embeddings``) of item ids; an unknown id raises
        :class:`UnknownItemError`, or gives -1 when not ``strict``."""
        return self._lookups.rows(ids, strict)

    def items_for_ids(self, ids: Sequence[int] | np.ndarray) -> pd.DataFrame:
        return self.items.iloc[self.rows_for_ids(ids)].reset_index(drop=True)

    def columns_for_ids(self, ids: Sequence[int] | np.ndarray, names: Sequence[str]
                        ) -> dict[str, list[Any]]:
        """Taken from per-generation column arrays: no DataFrame per call."""
        lk = self._lookups
        rows = lk.rows(ids)
        out: dict[str, list[Any]] = {}
        for name in names:
            col = lk.columns.get(name)
            if col is None:
                a = lk.items[name].array
                # numpy-backed columns as their ndarray (no copy); others (Arrow strings,
                # tz-aware datetimes) as the extension array, whose take gives the same values
                col = a.to_numpy() if isinstance(a, pd.arrays.NumpyExtensionArray) else a
                lk.columns[name] = col
            out[name] = col[rows].tolist() if isinstance(col, np.ndarray) else \
                list(col.take(rows))
        return out

    def vectors_for_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        lk = self._lookups
        rows = lk.rows(ids)
        x = lk.scan if lk.scan is not None else self.embeddings  # equal values; no memmap
        return np.asarray(x[rows], np.float32)

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
    def _require_writable(self) -> None:
        if not self.writable or self._lock_fd is None:
            raise StoreError(f"store {self.path} is open read-only")

    def _write_segment(self, emb: np.ndarray, items: pd.DataFrame) -> SegmentRecord:
        """A complete, checksummed segment folder (renamed into place, not yet committed)."""
        seg_root = self.path / "segments"
        tmp = seg_root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        with open(tmp / "embeddings.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(emb))
            f.flush()
            os.fsync(f.fileno())
        items.to_parquet(tmp / "items.parquet", index=False)
        _fsync_file(tmp / "items.parquet")
        m = Moments.of(emb)
        with open(tmp / "moments.npz", "wb") as f:
            np.savez(f, n=m.n, sum=m.sum, sumsq=m.sumsq)
            f.flush()
            os.fsync(f.fileno())
        files = {fname: FileRecord.of(tmp / fname) for fname in SEGMENT_FILES}
        name = f"seg-{self.generation + 1:06d}-{uuid.uuid4().hex[:6]}"
        rec = SegmentRecord(name, int(emb.shape[0]), files)
        (tmp / "segment.json").write_text(json.dumps(
            {**rec.to_dict(), "dim": self.dim, "dtype": self.dtype,
             "model_fingerprint": self.manifest.model.fingerprint}, indent=1))
        _fsync_file(tmp / "segment.json")
        os.rename(tmp, seg_root / name)
        _fsync_dir(seg_root)
        return rec

    def _upgraded(self, segs: list[SegmentRecord]) -> list[SegmentRecord]:
        """Format-1 entries with their checksums recorded (they passed the open checks)."""
        out = []
        for s in segs:
            if s.files is None:
                d = self.path / "segments" / s.name
                rows = int(np.load(d / "embeddings.npy", mmap_mode="r").shape[0])
                s = SegmentRecord(s.name, rows, {f: FileRecord.of(d / f) for f in SEGMENT_FILES})
            out.append(s)
        return out

    def _commit(self, segments: list[SegmentRecord], next_id: int, retired: list[str]) -> None:
        state = State(self._upgraded(segments), next_id, self.generation + 1, retired,
                      self.manifest.to_dict())
        _atomic_write_json(self.path / "state.json", state.to_dict())

    def _add(self, embeddings: np.ndarray, items: pd.DataFrame) -> np.ndarray:
        existing = self.rows_for_paths(items["path"].tolist())
        ids = np.where(existing >= 0, self.ids[np.maximum(existing, 0)] if len(self) else -1, -1)
        fresh = ids < 0
        next_id = self._state.next_id
        ids[fresh] = np.arange(next_id, next_id + int(fresh.sum()))
        rec = self._write_segment(embeddings, items.assign(id=ids))
        still_there = [r for r in self._state.retired if (self.path / "segments" / r).exists()]
        self._commit([*self._state.segments, rec], next_id + int(fresh.sum()), still_there)
        self._load()
        return np.asarray(ids, np.int64)

    def compact(self) -> None:
        """Rewrite the live rows as one segment (memmap-able, no superseded rows)."""
        self._require_writable()
        if len(self._segments) <= 1 and len(self._live_rows) == self._all_rows:
            return
        rec = self._write_segment(np.ascontiguousarray(self.embeddings), self._items)
        old = list(self._segments)
        self._commit([rec], self._state.next_id, old)
        for o in old:  # retired by the commit above: readers that still need them re-read
            shutil.rmtree(self.path / "segments" / o, ignore_errors=True)
        self._load()

    # ----------------------------------------------------------------- verify / repair
    @classmethod
    def verify_at(cls, location: str | os.PathLike[str]) -> VerifyReport:
        """Check everything without changing anything: manifest, state, every file's checksum,
        shapes, NaN/inf rows, moments against the embeddings, ids, unlisted folders
        (``git fsck`` for a store). Works on a store too damaged to open."""
        p = Path(location)
        rep = VerifyReport(str(p))
        if not p.is_dir():
            rep.problems.append(Problem(str(p), "not a directory", "check the path"))
            return rep
        try:
            manifest = Manifest.from_dict(json.loads((p / "manifest.json").read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            rep.problems.append(Problem("manifest.json", f"missing or unreadable ({e})",
                                        f"`rscir repair {p}` restores it from state.json"))
            manifest = None
        store = cls.__new__(cls)
        store.path, store.writable, store._lock_fd = p, False, None
        try:
            state: State | None = store._read_state()
        except StoreError as e:
            rep.problems.append(Problem("state.json", str(e).split("; run `rscir verify")[0],
                                        f"`rscir repair {p}` rebuilds it from the segments"))
            state = None
        if manifest is None and state is not None and state.manifest is not None:
            manifest = Manifest.from_dict(state.manifest)
        if manifest is None:
            return rep
        store.manifest = manifest
        if state is None:
            return rep
        if state.format < STATE_FORMAT:
            rep.notes.append("format-1 store: no checksums recorded yet (`rscir repair` records "
                             "them, as does the next commit of `rscir index`)")
        rep.segments = len(state.segments)
        for rec in state.segments:
            rep.problems += store._verify_segment(rec, rep)
        listed = {s.name for s in state.segments} | set(state.retired)
        for name in _segment_dirs(p, hidden=True):
            if name in listed:
                continue
            g = segment_generation(name)
            if g is not None and g <= state.generation:
                rep.problems.append(Problem(f"segments/{name}", "not listed in state.json",
                                            f"`rscir repair {p}` adds it back if intact"))
            else:
                rep.notes.append(f"segments/{name} was never committed (a writer stopped); the "
                                 "next writer moves it to quarantine/")
        if rep.ok:
            try:
                rep.items = len(cls.open(p))
            except StoreError as e:
                rep.problems.append(Problem("store", str(e).split("; run `rscir verify")[0],
                                            f"`rscir repair {p}`"))
        q = p / "quarantine"
        if q.is_dir() and any(q.iterdir()):
            rep.notes.append(f"quarantine/ holds {sum(1 for _ in q.glob('*.note.json'))} "
                             f"set-aside entries (`rscir repair {p} --purge` deletes them)")
        return rep

    def _verify_segment(self, rec: SegmentRecord, rep: VerifyReport) -> list[Problem]:
        where = f"segments/{rec.name}"
        fix = f"`rscir repair {self.path}`"
        try:
            emb, df, m = self._read_segment(rec, full=True)
        except (StoreDamagedError, _Vanished) as e:
            return [Problem(where, str(e).split("; run `rscir verify")[0], fix)]
        rep.checked_bytes += sum(f.bytes for f in (rec.files or {}).values())
        out = []
        bad = np.zeros(emb.shape[0], bool)
        for s in range(0, emb.shape[0], 1 << 16):
            bad[s : s + (1 << 16)] = ~np.isfinite(np.asarray(emb[s : s + (1 << 16)])).all(axis=1)
        if bad.any():
            out.append(Problem(where, f"{int(bad.sum())} embedding row(s) hold NaN or inf "
                               f"(e.g. row {int(np.flatnonzero(bad)[0])})",
                               f"{fix} quarantines the segment; re-index to embed its items again"))
        else:
            ref = Moments.of(emb)
            scale = max(1.0, float(np.abs(ref.sumsq).max()))
            if (ref.n != m.n or not np.allclose(m.sum, ref.sum, atol=1e-6 * scale)
                    or not np.allclose(m.sumsq, ref.sumsq, atol=1e-6 * scale)):
                out.append(Problem(where, "moments.npz does not match its embeddings",
                                   f"{fix} recomputes them"))
        if df["id"].duplicated().any() or (df["id"] < 0).any():
            out.append(Problem(where, "items.parquet holds duplicate or negative ids", fix))
        return out

    @classmethod
    def repair_at(cls, location: str | os.PathLike[str], *, purge: bool = False) -> RepairReport:
        """Rebuild what can be rebuilt (the manifest from the state's copy, the state from intact
        segments, moments from embeddings) and quarantine what cannot; ``purge`` then deletes
        what quarantine/ holds. Takes the writer lock."""
        p = Path(location)
        if not p.is_dir():
            raise StoreError(f"no store at {p}: not a directory")
        fd = _lock(p, "written")
        try:
            return _Repair(p).run(purge)
        finally:
            _unlock(fd)


class _Repair:
    """The steps of :meth:`DirectoryStore.repair` (lock held by the caller)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rep = RepairReport(str(path))

    def run(self, purge: bool) -> RepairReport:
        state_obj = self._state_obj()
        manifest = self._manifest(state_obj)
        seg_root = self.path / "segments"
        seg_root.mkdir(exist_ok=True)
        segs = self._segments_to_keep(manifest, state_obj)
        store = DirectoryStore.__new__(DirectoryStore)
        store.path, store.manifest, store.writable, store._lock_fd = self.path, manifest, False, None
        keep: list[SegmentRecord] = []
        next_id, gen = 0, 0
        for rec in segs:
            fixed = self._check_or_fix(store, rec)
            if fixed is None:
                continue
            keep.append(fixed)
            df = pd.read_parquet(seg_root / fixed.name / "items.parquet", columns=["id"])
            if len(df):
                next_id = max(next_id, int(df["id"].max()) + 1)
            gen = max(gen, segment_generation(fixed.name) or 0)
        if state_obj is not None:
            try:
                old = State.parse(state_obj, self.path)
                next_id, gen = max(next_id, old.next_id), max(gen, old.generation)
            except StoreDamagedError:
                pass
        listed = {r.name for r in keep}
        for name in _segment_dirs(self.path, hidden=True):
            if name not in listed:
                self.rep.quarantined.append(str(quarantine(
                    self.path, seg_root / name, "not part of the repaired state").name))
        for tmp in self.path.glob(".*.tmp"):
            self.rep.quarantined.append(str(quarantine(self.path, tmp, "half-written file").name))
        state = State(keep, next_id, gen + 1, [], manifest.to_dict())
        _atomic_write_json(self.path / "state.json", state.to_dict())
        self.rep.actions.append(f"wrote state.json: {len(keep)} segment(s), generation {gen + 1}")
        if purge:
            self.rep.purged = purge_quarantine(self.path)
        return self.rep

    def _state_obj(self) -> Any:
        try:
            return json.loads((self.path / "state.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            self.rep.actions.append("state.json is missing or unreadable: rebuilt from segments")
            return None

    def _manifest(self, state_obj: Any) -> Manifest:
        mf = self.path / "manifest.json"
        try:
            return Manifest.from_dict(json.loads(mf.read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            pass
        copy = state_obj.get("manifest") if isinstance(state_obj, dict) else None
        if not isinstance(copy, dict):
            raise StoreDamagedError(
                f"{mf} is missing or unreadable and state.json holds no copy of it; the store's "
                "model cannot be known — re-index into a new store (nothing was changed)")
        manifest = Manifest.from_dict(copy)
        _atomic_write_json(mf, manifest.to_dict())
        self.rep.actions.append("restored manifest.json from the copy in state.json")
        return manifest

    def _segments_to_keep(self, manifest: Manifest, state_obj: Any) -> list[SegmentRecord]:
        """The state's segments when it parses, else every segment folder with a record."""
        try:
            if state_obj is not None:
                return State.parse(state_obj, self.path).segments
        except (StoreDamagedError, StoreError) as e:
            self.rep.actions.append(f"state.json is damaged ({str(e).split(';')[0]}): rebuilt "
                                    "from the segment folders")
        out = []
        for name in sorted(_segment_dirs(self.path), key=lambda n: segment_generation(n) or 0):
            meta = self.path / "segments" / name / "segment.json"
            try:
                obj = json.loads(meta.read_text())
                files = {k: FileRecord(int(v["bytes"]), str(v["sha256"]))
                         for k, v in obj["files"].items()}
                out.append(SegmentRecord(name, int(obj["rows"]), files))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
                out.append(SegmentRecord(name, -1, None))  # checked below by content alone
        return out

    def _check_or_fix(self, store: DirectoryStore, rec: SegmentRecord) -> SegmentRecord | None:
        """The segment as it can be kept (moments recomputed if only they are wrong), or None
        when it went to quarantine."""
        d = self.path / "segments" / rec.name
        try:
            emb, df, _ = store._read_segment(rec, full=rec.files is not None)
        except (StoreDamagedError, _Vanished) as e:
            if "moments.npz" in str(e) and self._moments_only(store, rec):
                return self._recompute_moments(rec)
            self.rep.quarantined.append(str(quarantine(
                self.path, d, f"damaged: {str(e).split('; run')[0]}").name))
            return None
        if not np.isfinite(np.asarray(emb, np.float64)).all():
            self.rep.quarantined.append(str(quarantine(
                self.path, d, "embeddings hold NaN or inf rows").name))
            return None
        ref = Moments.of(emb)
        with np.load(d / "moments.npz") as z:
            ok = int(z["n"]) == ref.n and np.allclose(z["sumsq"], ref.sumsq, atol=1e-6 * max(
                1.0, float(np.abs(ref.sumsq).max())))
        if not ok:
            return self._recompute_moments(rec)
        if rec.files is None:
            rec = SegmentRecord(rec.name, len(df), {f: FileRecord.of(d / f) for f in SEGMENT_FILES})
            self.rep.actions.append(f"segments/{rec.name}: recorded checksums")
        return rec

    def _moments_only(self, store: DirectoryStore, rec: SegmentRecord) -> bool:
        """True when embeddings and items are intact and only moments.npz is bad."""
        d = self.path / "segments" / rec.name
        try:
            for fname in ("embeddings.npy", "items.parquet"):
                if rec.files is not None and sha256_file(d / fname) != rec.files[fname].sha256:
                    return False
            emb = np.load(d / "embeddings.npy", mmap_mode="r")
            rows = len(pd.read_parquet(d / "items.parquet", columns=["id"]))
            return bool(emb.ndim == 2 and emb.shape == (rows, store.dim)
                        and np.isfinite(np.asarray(emb, np.float64)).all())
        except Exception:  # noqa: BLE001 - anything unreadable: not only the moments
            return False

    def _recompute_moments(self, rec: SegmentRecord) -> SegmentRecord:
        d = self.path / "segments" / rec.name
        emb = np.load(d / "embeddings.npy", mmap_mode="r")
        m = Moments.of(emb)
        with open(d / ".moments.npz.tmp", "wb") as f:
            np.savez(f, n=m.n, sum=m.sum, sumsq=m.sumsq)
            f.flush()
            os.fsync(f.fileno())
        if (d / "moments.npz").exists():
            quarantine(self.path, d / "moments.npz", f"wrong moments of segments/{rec.name}")
        os.replace(d / ".moments.npz.tmp", d / "moments.npz")
        self.rep.actions.append(f"segments/{rec.name}: recomputed moments.npz")
        return SegmentRecord(rec.name, int(emb.shape[0]),
                             {f: FileRecord.of(d / f) for f in SEGMENT_FILES})


# ----------------------------------------------------------------------------- helpers
def _lock(path: Path, doing: str) -> int:
    """The store's exclusive writer lock (flock on ``.lock``), or :class:`StoreLockedError`."""
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLockedError(f"store {path} is being {doing} by another process; wait for it "
                               "to finish (or stop it) and try again") from None
    return fd


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


def _segment_dirs(path: Path, *, hidden: bool = False) -> Iterator[str]:
    """Names of the folders under ``segments/`` (``.tmp-*`` ones too when ``hidden``)."""
    seg = path / "segments"
    if not seg.is_dir():
        return
    for child in sorted(seg.iterdir()):
        if child.is_dir() and (hidden or not child.name.startswith(".")):
            yield child.name


def _holds_data(p: Path) -> bool:
    """True when a folder holds store data (segment folders, or a state listing segments)."""
    if any(_segment_dirs(p)):
        return True
    f = p / "state.json"
    if not f.is_file():
        return False
    try:
        obj = json.loads(f.read_text())
        return not (isinstance(obj, dict) and obj.get("segments") == [])
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return True
