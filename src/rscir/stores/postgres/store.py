"""A store in PostgreSQL with pgvector (≥ 0.8), for archives that many users and processes share.

Layout, inside one schema per store (``?schema=NAME`` in the URI, default ``rscir``)::

    meta      one row: manifest (jsonb: model, dim, dtype, archive root), next_id, generation,
              max_norm (bound on stored norms, for rounding margins), HNSW build parameters
    items     id, path (unique), size, mtime_ns, width, height, label, labels[], lon, lat,
              embedding halfvec(d) | vector(d)  + an HNSW index (inner product) and metadata indexes
    moments   one row: n, Σx, Σxxᵀ (float64 bytes) over the stored embeddings

Every :meth:`PgStore.add` is one transaction that writes the rows, updates the moments and bumps
the generation, so readers (in REPEATABLE READ) always see items and moments that agree.

Search (:class:`PgSearcher`) has the embedded store's semantics: WeiCom normalization is exact
from the moments (μ = Σx/n, unbiased variance qᵀΣq, see :mod:`rscir.moments`); small archives
and small filtered subsets are scored in full (similarities in SQL, then every item that can be
in the top k given SQL's rounding is re-scored here); larger ones take candidates from the HNSW
index (iterative scans, so filtered queries still fill k rows), re-score them exactly in numpy
with :func:`rscir.scoring.fuse`, and grow the candidate set until a bound proves that no unseen
item can enter the top k (else the full scoring answers). That proof is exact up to the index's
recall; docs/postgres.md says what was measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import struct
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...encoders.base import Encoder, ImageLike, ModelInfo, l2_normalize
from ...errors import ModelMismatchError
from ...moments import ArchiveMoments
from ...scoring import NEEDS_IMAGE, NEEDS_TEXT, QueryStats, check_lam, check_method, fuse, norm_cdf
from ...search.searcher import Hit, ItemFilter, SearchResult
from ..directory import DTYPES, Manifest, Moments, StoreError, normalize_items

MIN_PGVECTOR = (0, 8, 0)
SEARCH_MODES = ("auto", "exact", "index")
# `rscir search --strategy` (the embedded store's names) → PgSearcher mode
PG_MODES = {"auto": "auto", "brute": "exact", "exact-stream": "exact", "ann": "index"}
_F32_EPS = 2.0**-24  # float32 unit roundoff: pgvector and BLAS sum products in float32
_PHI_MAX = 0.3989422804014327  # max of the standard normal density, 1/sqrt(2*pi)
DEFAULT_SCHEMA = "rscir"
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_VEC_TYPE = {"float16": "halfvec", "float32": "vector"}
_META_COLS = ("id", "path", "size", "mtime_ns", "width", "height", "label", "labels", "lon", "lat")


def is_pg_uri(uri: object) -> bool:
    """True for ``postgresql://`` / ``postgres://`` store addresses."""
    return isinstance(uri, str) and uri.startswith(("postgresql://", "postgres://"))


def split_uri(uri: str) -> tuple[str, str]:
    """(libpq conninfo without our ``schema`` parameter, schema name)."""
    if not is_pg_uri(uri):
        raise ValueError(f"not a postgresql:// URI: {uri!r}")
    parts = urllib.parse.urlsplit(uri)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schema = DEFAULT_SCHEMA
    rest = []
    for k, v in query:
        if k == "schema":
            schema = v
        else:
            rest.append((k, v))
    if not _SCHEMA_RE.match(schema):
        raise ValueError(f"schema must match {_SCHEMA_RE.pattern}, got {schema!r}")
    conninfo = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    return conninfo, schema


def redact_uri(uri: str) -> str:
    """The URI without its password (in the user part or a ``password=`` parameter), for logs,
    error messages and ``/info``."""
    parts = urllib.parse.urlsplit(uri)
    netloc, query = parts.netloc, parts.query
    if parts.password:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if any(key.lower() == "password" for key, _ in pairs):
        query = urllib.parse.urlencode(
            [(key, "***" if key.lower() == "password" else v) for key, v in pairs], safe="*")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


@contextlib.contextmanager
def _db_errors(uri: str) -> Iterator[None]:
    """Database errors (connection lost, missing privileges, bad data) as :class:`StoreError`,
    which the CLI and the server report as clean messages."""
    import psycopg

    try:
        yield
    except psycopg.Error as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoreError(f"{redact_uri(uri)}: {msg}") from e


def _connect(uri: str, conninfo: str) -> Any:
    import psycopg

    try:
        return psycopg.connect(conninfo, autocommit=False, connect_timeout=10)
    except psycopg.Error as e:
        raise StoreError(f"cannot connect to {redact_uri(uri)}: {str(e).strip()}") from e


# --------------------------------------------------------------------------------- wire format
# pgvector's binary formats (halfvec_send / vector_send): int16 dim, int16 unused, then dim
# big-endian float16 / float32 values. Written here because pgvector-python is not a dependency
# and binary transfer avoids formatting and parsing floats as text for every row.
def _make_adapters(conn: Any) -> None:
    from psycopg.adapt import Dumper, Loader
    from psycopg.pq import Format
    from psycopg.types import TypeInfo

    for tname, be in (("halfvec", ">f2"), ("vector", ">f4")):
        info = TypeInfo.fetch(conn, tname)
        if info is None:
            raise StoreError("the pgvector extension is not installed in this database")

        class _Load(Loader):
            format = Format.BINARY
            _dt = be

            def load(self, data: Any) -> np.ndarray:
                b = bytes(data)
                (dim,) = struct.unpack_from(">H", b)
                return np.frombuffer(b, self._dt, dim, 4).astype(np.float32)

        class _Dump(Dumper):
            format = Format.BINARY
            oid = info.oid
            _dt = be

            def dump(self, obj: Any) -> bytes:
                a = np.asarray(obj).ravel()
                return struct.pack(">HH", a.shape[0], 0) + a.astype(self._dt).tobytes()

        info.register(conn)  # lets COPY name the type
        conn.adapters.register_loader(info.oid, _Load)
        # registered under a private class so it never captures ordinary parameters; COPY's
        # set_types() finds it by the type's oid (query vectors are sent as text literals)
        marker = type(f"_{tname}_param", (), {})
        conn.adapters.register_dumper(marker, _Dump)


class _Pool:
    """A few connections handed out one per thread at a time. Hand-written because psycopg_pool
    is not among the project's dependencies; enough for a server's worker threads."""

    def __init__(self, conninfo: str, size: int) -> None:
        self.conninfo = conninfo
        self.size = size
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._made = 0
        self._lock = threading.Lock()
        self._sem = threading.BoundedSemaphore(size)
        self._all: list[Any] = []

    def _new(self) -> Any:
        import psycopg

        conn = psycopg.connect(self.conninfo, autocommit=False, connect_timeout=10)
        _make_adapters(conn)
        conn.commit()
        # every use is a read: one snapshot per borrow, so items and moments always agree
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        return conn

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        self._sem.acquire()
        conn = None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._new()
                with self._lock:
                    self._all.append(conn)
            yield conn
            conn.rollback()  # end any read transaction
        except BaseException:
            if conn is not None:  # a broken connection is dropped, not reused
                with contextlib.suppress(Exception):
                    conn.close()
                with self._lock:
                    self._all = [c for c in self._all if c is not conn]
                conn = None
            raise
        finally:
            if conn is not None and not conn.closed:
                self._idle.put(conn)
            self._sem.release()

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                with contextlib.suppress(Exception):
                    c.close()
            self._all.clear()


def _sql(template: str, schema: str) -> Any:
    from psycopg import sql

    return sql.SQL(template).format(s=sql.Identifier(schema))


def _pack(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f8").tobytes()


def _unpack(b: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(bytes(b), "<f8").reshape(shape).copy()


def _vec_literal(v: np.ndarray) -> str:
    """Text form of a query vector; repr of float32 values round-trips exactly."""
    return "[" + ",".join(repr(float(x)) for x in np.asarray(v, np.float32)) + "]"


class PgStore:
    """The :class:`rscir.store.Store` interface (as ingestion and search use it) on Postgres.

    Open with :meth:`open` (read) or :meth:`open_or_create` (write; one writer at a time, held
    by a session advisory lock until :meth:`close`)."""

    def __init__(self, uri: str, *, writable: bool = False, pool_size: int = 8) -> None:
        self.uri = uri
        self.conninfo, self.schema = split_uri(uri)
        self.writable = writable
        self._conn = _connect(uri, self.conninfo)
        self._lock = threading.RLock()
        self._pool = _Pool(self.conninfo, pool_size)
        self._cache: dict[str, Any] = {}
        try:
            with _db_errors(uri):
                self._open()
        except BaseException:
            self._conn.close()
            raise

    def _open(self) -> None:
        self._check_pgvector()
        _make_adapters(self._conn)
        if not self._exists():
            raise StoreError(
                f"no store at {redact_uri(self.uri)} (schema {self.schema!r}): run "
                "`rscir index FOLDER --store URI` first"
            )
        if self.writable:
            self._acquire_lock()
        self._conn.commit()
        self._load_meta()

    # ----------------------------------------------------------------- creation / opening
    @classmethod
    def exists(cls, uri: str) -> bool:
        """True when the URI's schema holds a store (False for an empty database)."""
        conninfo, schema = split_uri(uri)
        with _db_errors(uri), _connect(uri, conninfo) as conn:
            row = conn.execute("SELECT to_regclass(%s)", (f"{schema}.meta",)).fetchone()
        return row is not None and row[0] is not None

    @classmethod
    def open(cls, uri: str, *, writable: bool = False) -> PgStore:
        return cls(uri, writable=writable)

    @classmethod
    def create(cls, uri: str, model: ModelInfo, root: str | os.PathLike[str], *,
               dtype: str = "float16", m: int = 16, ef_construction: int = 128) -> PgStore:
        """Make the schema and tables of a new, empty store, in one transaction.

        ``m`` and ``ef_construction`` shape the HNSW graph built by :meth:`compact`; 128 (twice
        pgvector's default) gave markedly better recall on clustered embeddings for 1.5× the
        build time (docs/postgres.md)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        conninfo, schema = split_uri(uri)
        manifest = Manifest(model=model, dim=model.dim, dtype=dtype, root=str(Path(root).resolve()))
        vt = _VEC_TYPE[dtype]
        d = int(model.dim)
        conn = _connect(uri, conninfo)
        with _db_errors(uri), conn:
            _ensure_extension(conn, uri)
            if conn.execute("SELECT to_regclass(%s)", (f"{schema}.meta",)).fetchone()[0]:
                raise StoreError(f"{redact_uri(uri)} already holds a store; open it instead")
            for stmt in (
                "CREATE SCHEMA IF NOT EXISTS {s}",
                "CREATE TABLE {s}.items (id bigint PRIMARY KEY, path text NOT NULL UNIQUE, "
                "size bigint NOT NULL, mtime_ns bigint NOT NULL, width integer NOT NULL, "
                "height integer NOT NULL, label text, labels text[] NOT NULL DEFAULT '{{}}', "
                f"lon double precision, lat double precision, embedding {vt}({d}) NOT NULL)",
                "CREATE INDEX ON {s}.items (label)",
                "CREATE INDEX ON {s}.items USING gin (labels)",
                "CREATE INDEX ON {s}.items (lon, lat)",
                "CREATE TABLE {s}.moments (one boolean PRIMARY KEY DEFAULT true CHECK (one), "
                "n bigint NOT NULL, sum bytea NOT NULL, sumsq bytea NOT NULL)",
                "CREATE TABLE {s}.meta (one boolean PRIMARY KEY DEFAULT true CHECK (one), "
                "manifest jsonb NOT NULL, next_id bigint NOT NULL, generation bigint NOT NULL, "
                "max_norm double precision NOT NULL, hnsw jsonb NOT NULL)",
            ):
                conn.execute(_sql(stmt, schema))
            z = Moments.zeros(d)
            conn.execute(_sql("INSERT INTO {s}.moments (n, sum, sumsq) VALUES (0, %s, %s)", schema),
                         (_pack(z.sum), _pack(z.sumsq)))
            conn.execute(
                _sql("INSERT INTO {s}.meta (manifest, next_id, generation, max_norm, hnsw) "
                     "VALUES (%s, 0, 0, 0, %s)", schema),
                (json.dumps(manifest.to_dict()),
                 json.dumps({"m": int(m), "ef_construction": int(ef_construction)})),
            )
        conn.close()
        return cls(uri, writable=True)

    @classmethod
    def open_or_create(cls, uri: str, model: ModelInfo, root: str | os.PathLike[str], *,
                       dtype: str = "float16") -> PgStore:
        """Open for appending (checking model, archive root and dtype) or create if absent."""
        if not cls.exists(uri):
            return cls.create(uri, model, root, dtype=dtype)
        st = cls(uri, writable=True)
        try:
            st.check_model(model)
            if Path(st.root).resolve() != Path(root).resolve():
                raise StoreError(f"store {redact_uri(uri)} indexes archive {st.root}, not "
                                 f"{Path(root).resolve()}; use another ?schema= for another archive")
            if dtype != st.manifest.dtype:
                raise StoreError(f"store {redact_uri(uri)} holds {st.manifest.dtype}, not {dtype}")
        except Exception:
            st.close()
            raise
        return st

    def _check_pgvector(self) -> None:
        row = self._conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        if row is None:
            raise StoreError(f"{redact_uri(self.uri)}: the pgvector extension is not installed "
                             "(CREATE EXTENSION vector; needs pgvector >= 0.8)")
        _check_version(self._conn)

    def _exists(self) -> bool:
        row = self._conn.execute("SELECT to_regclass(%s)", (f"{self.schema}.meta",)).fetchone()
        return row is not None and row[0] is not None

    def _acquire_lock(self) -> None:
        got = self._conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                                 (f"rscir:{self.schema}",)).fetchone()[0]
        if not got:
            raise StoreError(f"store {redact_uri(self.uri)} is being written by another process")

    def check_model(self, model: ModelInfo) -> None:
        mine = self.manifest.model
        if not mine.same_space(model):
            raise ModelMismatchError(
                f"store {redact_uri(self.uri)} was built with model {mine.name!r} (arch "
                f"{mine.arch}, dim {mine.dim}), but model {model.name!r} (arch {model.arch}, dim "
                f"{model.dim}) was given; use the same model or a new store"
            )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()  # ends the session: releases the advisory lock
        self._pool.close()

    def __enter__(self) -> PgStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- reading
    def _load_meta(self) -> None:
        with self._lock:
            row = self._conn.execute(
                _sql("SELECT manifest, next_id, generation, hnsw FROM {s}.meta", self.schema)
            ).fetchone()
            self._conn.commit()
            mf = row[0] if isinstance(row[0], dict) else json.loads(row[0])
            self.manifest = Manifest.from_dict(mf)
            self._next_id = int(row[1])
            self._generation = int(row[2])
            self._hnsw = row[3] if isinstance(row[3], dict) else json.loads(row[3])
            self._cache.clear()

    def refresh(self) -> bool:
        """Re-read the state if another process committed; True when it changed."""
        with self._lock:
            gen = int(self._conn.execute(
                _sql("SELECT generation FROM {s}.meta", self.schema)).fetchone()[0])
            self._conn.commit()
            if gen != self._generation:
                self._load_meta()
                return True
            return False

    @property
    def path(self) -> Path:
        """A local folder for this store's reports and derived artifacts (Postgres holds the
        data); under ``$RSCIR_CACHE`` (default ``~/.cache/rscir``)."""
        base = Path(os.environ.get("RSCIR_CACHE", "~/.cache/rscir")).expanduser()
        info = urllib.parse.urlsplit(self.conninfo)
        q = dict(urllib.parse.parse_qsl(info.query))
        slug = "-".join(x for x in (info.hostname or q.get("host", "local"), str(info.port or ""),
                                    info.path.strip("/"), self.schema) if x)
        p = base / "pg" / re.sub(r"[^A-Za-z0-9_.-]+", "_", slug)
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def root(self) -> str:
        return self.manifest.root

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def vec_type(self) -> str:
        return _VEC_TYPE[self.manifest.dtype]

    def __len__(self) -> int:
        return len(self.items)

    def _query_frame(self, where: str = "", params: Sequence[Any] = ()) -> pd.DataFrame:
        with self._pool.connection() as conn:
            rows = conn.execute(_sql(f"SELECT {', '.join(_META_COLS)} FROM {{s}}.items {where} "
                                     "ORDER BY id", self.schema), params).fetchall()
        return _frame(rows)

    @property
    def items(self) -> pd.DataFrame:
        """Metadata of all items ordered by id (cached until the generation changes)."""
        if "items" not in self._cache:
            self._cache["items"] = self._query_frame()
        return self._cache["items"]

    @property
    def ids(self) -> np.ndarray:
        return self.items["id"].to_numpy()

    @property
    def embeddings(self) -> np.ndarray:
        """(N, d) embeddings in ``items`` order, fetched on first use (for tools and tests)."""
        if "emb" not in self._cache:
            with self._lock:
                cur = self._conn.cursor(binary=True)
                cur.execute(_sql("SELECT embedding FROM {s}.items ORDER BY id", self.schema))
                rows = cur.fetchall()
                self._conn.commit()
            dt = DTYPES[self.manifest.dtype]
            self._cache["emb"] = (np.stack([r[0] for r in rows]).astype(dt) if rows
                                  else np.zeros((0, self.dim), dt))
        return self._cache["emb"]

    def moments(self) -> Moments:
        with self._lock:
            row = self._conn.execute(
                _sql("SELECT n, sum, sumsq FROM {s}.moments", self.schema)).fetchone()
            self._conn.commit()
        d = self.dim
        return Moments(int(row[0]), _unpack(row[1], (d,)), _unpack(row[2], (d, d)))

    def rows_for_ids(self, ids: Any) -> np.ndarray:
        want = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        have = self.ids  # sorted by id
        pos = np.searchsorted(have, want)
        pos_c = np.minimum(pos, max(len(have) - 1, 0))
        ok = (pos < len(have)) & (have[pos_c] == want) if len(have) else pos < 0
        if not np.all(ok):
            raise KeyError(f"unknown item id(s): {want[~ok][:10].tolist()}")
        return pos_c.astype(np.int64)

    def rows_for_paths(self, paths: list[str]) -> np.ndarray:
        return pd.Index(self.items["path"]).get_indexer(pd.Index(paths)).astype(np.int64)

    def items_for_ids(self, ids: Sequence[int]) -> pd.DataFrame:
        """Metadata of these ids, in the order given; KeyError for unknown ids."""
        want = [int(i) for i in ids]
        df = self._query_frame("WHERE id = ANY(%s)", (want,))
        idx = pd.Index(df["id"]).get_indexer(want)
        if (idx < 0).any():
            raise KeyError(f"unknown item id(s): {[w for w, i in zip(want, idx, strict=True) if i < 0][:10]}")
        return df.iloc[idx].reset_index(drop=True)

    def resolve_path(self, rel: str) -> Path:
        root = Path(self.root).resolve()
        p = (root / rel).resolve()
        if p != root and root not in p.parents:
            raise ValueError(f"path {rel!r} is outside the archive root")
        return p

    def artifact_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad artifact name {name!r}")
        d = self.path / "artifacts" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def has_hnsw(self) -> bool:
        with self._lock:
            row = self._conn.execute(
                "SELECT 1 FROM pg_indexes WHERE schemaname = %s AND indexname = 'items_embedding_hnsw'",
                (self.schema,)).fetchone()
            self._conn.commit()
        return row is not None

    def info(self) -> dict[str, Any]:
        items = self.items
        return {
            "path": redact_uri(self.uri),
            "backend": "postgres",
            "schema": self.schema,
            "root": self.root,
            "items": len(items),
            "dim": self.dim,
            "dtype": self.manifest.dtype,
            "generation": self.generation,
            "hnsw": self.has_hnsw(),
            "model": self.manifest.model.to_dict(),
            "rscir_version": self.manifest.rscir_version,
            "classes": int(items["label"].dropna().nunique()),
            "georeferenced": int(items["lon"].notna().sum()),
        }

    # ----------------------------------------------------------------- writing
    def add(self, embeddings: np.ndarray, items: pd.DataFrame | list[dict[str, Any]]) -> np.ndarray:
        """Insert rows in one transaction (a known path is replaced and keeps its id); the moments
        and generation change in the same transaction. Returns the rows' ids."""
        if not self.writable:
            raise StoreError(f"store {redact_uri(self.uri)} is open read-only")
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
        emb = emb.astype(DTYPES[self.manifest.dtype])  # moments are over values as stored
        # an upper bound on stored norms makes the search's rounding margins rigorous
        max_norm = float(np.linalg.norm(emb.astype(np.float64), axis=1).max())
        s = self.schema
        with self._lock, _db_errors(self.uri), self._conn.transaction():
            cur = self._conn.cursor(binary=True)
            meta = cur.execute(_sql("SELECT next_id, generation FROM {s}.meta FOR UPDATE", s)
                               ).fetchone()
            next_id, gen = int(meta[0]), int(meta[1])
            old = cur.execute(_sql("SELECT id, path, embedding FROM {s}.items WHERE path = ANY(%s)",
                                   s), (df["path"].tolist(),)).fetchall()
            old_ids = {p: int(i) for i, p, _ in old}
            ids = np.array([old_ids.get(p, -1) for p in df["path"]], np.int64)
            fresh = ids < 0
            ids[fresh] = np.arange(next_id, next_id + int(fresh.sum()))
            df["id"] = ids
            mom = self._read_moments(cur) + Moments.of(emb)
            if old:
                old_emb = np.stack([e for _, _, e in old]).astype(emb.dtype)
                mom = mom - Moments.of(old_emb)
                cur.execute(_sql("DELETE FROM {s}.items WHERE id = ANY(%s)", s),
                            (list(old_ids.values()),))
            self._copy_rows(cur, df, emb)
            cur.execute(_sql("UPDATE {s}.moments SET n = %s, sum = %s, sumsq = %s", s),
                        (mom.n, _pack(mom.sum), _pack(mom.sumsq)))
            cur.execute(_sql("UPDATE {s}.meta SET next_id = %s, generation = %s, "
                             "max_norm = greatest(max_norm, %s)", s),
                        (next_id + int(fresh.sum()), gen + 1, max_norm))
        self._load_meta()
        return ids

    def _read_moments(self, cur: Any) -> Moments:
        row = cur.execute(_sql("SELECT n, sum, sumsq FROM {s}.moments FOR UPDATE", self.schema)
                          ).fetchone()
        d = self.dim
        return Moments(int(row[0]), _unpack(row[1], (d,)), _unpack(row[2], (d, d)))

    def _copy_rows(self, cur: Any, df: pd.DataFrame, emb: np.ndarray) -> None:
        cols = ", ".join(_META_COLS) + ", embedding"
        types = ["int8", "text", "int8", "int8", "int4", "int4", "text", "text[]", "float8",
                 "float8", self.vec_type]
        lon = df["lon"].to_numpy(np.float64)
        lat = df["lat"].to_numpy(np.float64)
        with cur.copy(_sql(f"COPY {{s}}.items ({cols}) FROM STDIN (FORMAT BINARY)",
                           self.schema)) as cp:
            cp.set_types(types)
            for i, r in enumerate(df.itertuples(index=False)):
                cp.write_row((
                    int(r.id), r.path, int(r.size), int(r.mtime_ns), int(r.width), int(r.height),
                    r.label if isinstance(r.label, str) else None, [str(v) for v in r.labels],
                    None if np.isnan(lon[i]) else float(lon[i]),
                    None if np.isnan(lat[i]) else float(lat[i]),
                    emb[i],
                ))

    def compact(self) -> None:
        """Finish a bulk load: build the HNSW index if missing (cheaper once than per insert)
        and refresh the planner's statistics."""
        if not self.writable:
            raise StoreError(f"store {redact_uri(self.uri)} is open read-only")
        ops = f"{self.vec_type}_ip_ops"
        stmt = ("CREATE INDEX IF NOT EXISTS items_embedding_hnsw ON {s}.items USING hnsw "
                f"(embedding {ops}) WITH (m = {int(self._hnsw['m'])}, "
                f"ef_construction = {int(self._hnsw['ef_construction'])})")
        with self._lock, _db_errors(self.uri):
            self._conn.execute(_sql(stmt, self.schema))
            self._conn.commit()
            self._conn.autocommit = True
            try:
                self._conn.execute(_sql("ANALYZE {s}.items", self.schema))
            finally:
                self._conn.autocommit = False


def _ensure_extension(conn: Any, uri: str) -> None:
    """Install pgvector in this database when missing (needs the CREATE privilege on it; on
    managed servers the extension may have to be allow-listed first)."""
    import psycopg

    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is None:
        try:
            conn.execute("CREATE EXTENSION vector")
        except psycopg.Error as e:
            raise StoreError(
                f"{redact_uri(uri)}: the pgvector extension is not installed and could not be "
                f"created ({str(e).strip().splitlines()[0]}); ask an administrator to run "
                "CREATE EXTENSION vector (pgvector >= 0.8) in this database") from e
    _check_version(conn)


def _check_version(conn: Any) -> None:
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    if row is None:
        raise StoreError("the pgvector extension is not installed")
    ver = tuple(int(x) for x in re.findall(r"\d+", row[0])[:3])
    if ver < MIN_PGVECTOR:
        raise StoreError(f"pgvector {row[0]} is too old: rscir needs >= 0.8 (halfvec and "
                         "iterative index scans, so that filtered searches still return k rows)")


def _frame(rows: list[tuple[Any, ...]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(_META_COLS))
    if not len(df):
        return normalize_items(pd.DataFrame({"path": pd.Series(dtype=object)}))
    df["labels"] = [list(v) if v is not None else [] for v in df["labels"]]
    for c in ("lon", "lat"):
        df[c] = pd.to_numeric(df[c]).astype("float64")
    return normalize_items(df)


# ===================================================================================== search
@dataclass
class CandidateStats:
    """How one query was answered: candidate rounds and whether an exact scan was needed."""

    rounds: int = 0
    candidates: int = 0
    exact_scan: bool = False


def _where_sql(where: ItemFilter | None, exclude_id: int | None) -> tuple[str, list[Any]]:
    conds: list[str] = []
    params: list[Any] = []
    if exclude_id is not None:
        conds.append("id <> %s")
        params.append(int(exclude_id))
    if where is not None and where.labels:
        conds.append("(label = ANY(%s) OR labels && %s::text[])")
        params += [list(where.labels), list(where.labels)]
    if where is not None and where.bbox is not None:
        x0, y0, x1, y1 = (float(v) for v in where.bbox)
        if x0 > x1 or y0 > y1:
            raise ValueError("bbox must be (min_lon, min_lat, max_lon, max_lat)")
        conds.append("lon BETWEEN %s AND %s AND lat BETWEEN %s AND %s")
        params += [x0, x1, y0, y1]
    return ("WHERE " + " AND ".join(conds)) if conds else "", params


def _weicom_bound(a_z: float, b_z: float, line: float, lam: float) -> float:
    """max λΦ(zt) + (1−λ)Φ(zi) over zi ≤ A, zt ≤ B, (1−λ)zi + λzt ≤ L.

    The objective grows in both coordinates, so the maximum lies on the line (or at the corner
    (A, B) when that is feasible). On the line its derivative vanishes where φ(zi) = φ(zt), i.e.
    zi = L or zi = L/(1−2λ); those points and the segment's ends are all the candidates."""
    phi = norm_cdf

    def f(zi: float, zt: float) -> float:
        v = phi(np.array([[zt, zi]], np.float64), QueryStats(np.zeros((1, 1)), np.ones((1, 1))))
        return float(lam * v[0, 0] + (1 - lam) * v[0, 1])

    if (1 - lam) * a_z + lam * b_z <= line:
        return f(a_z, b_z)
    lo = (line - lam * b_z) / (1 - lam)  # zt = B here
    hi = a_z
    pts = [lo, hi, line]
    if lam != 0.5:
        pts.append(line / (1 - 2 * lam))
    best = -np.inf
    for zi in pts:
        if lo - 1e-12 <= zi <= hi + 1e-12:
            zt = min(b_z, (line - (1 - lam) * zi) / lam)
            best = max(best, f(min(zi, a_z), zt))
    return best


class PgSearcher:
    """Composed search on a :class:`PgStore`, with the semantics of :class:`rscir.search.Searcher`.

    ``mode``: "exact" scores every qualifying item (similarities in SQL, the best re-scored
    here), "index" takes candidates from the HNSW index, "auto" (default) is exact when at most
    ``exact_below`` items pass the filter and uses the index above. Index results are exact up
    to the index's recall (``ef_search``; see docs/postgres.md).

    Thread-safe: each query borrows one pooled connection and reads in one REPEATABLE READ
    snapshot, so items and moments agree even while another process is indexing."""

    def __init__(self, store: PgStore, encoder: Encoder | None, *, mode: str = "auto",
                 exact_below: int = 20_000, ef_search: int = 1000,
                 max_candidates: int = 4096) -> None:
        if encoder is not None:
            store.check_model(encoder.info)
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {', '.join(SEARCH_MODES)}, got {mode!r}")
        self.store = store
        self.encoder = encoder
        self.mode = mode
        self.exact_below = int(exact_below)
        self.ef_search = ef_search
        self.max_candidates = max_candidates
        self._mom_lock = threading.Lock()
        self._moments: tuple[int, ArchiveMoments | None, int] | None = None

    # ----------------------------------------------------------------- query vectors
    def _require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise RuntimeError("this searcher has no encoder: pass one to embed images or texts")
        return self.encoder

    def image_vector(self, image: str | os.PathLike[str] | ImageLike) -> tuple[np.ndarray, int | None]:
        """Embedding of a query image and its item id when it is an unchanged archive file."""
        from ...ingest.images import load_image

        if isinstance(image, str | os.PathLike):
            p = Path(image)
            if not p.is_file():
                raise FileNotFoundError(f"query image not found: {p}")
            root = Path(self.store.root).resolve()
            rp = p.resolve()
            if root in rp.parents:
                st = p.stat()
                df = self.store._query_frame("WHERE path = %s AND size = %s AND mtime_ns = %s",
                                             (rp.relative_to(root).as_posix(), st.st_size,
                                              st.st_mtime_ns))
                if len(df):
                    iid = int(df["id"].iloc[0])
                    return self.item_vector(iid), iid
            pil, _ = load_image(p)
            return self._require_encoder().encode_images([pil])[0], None
        return self._require_encoder().encode_images([image])[0], None

    def text_vector(self, texts: str | Sequence[str]) -> np.ndarray:
        tl = [texts] if isinstance(texts, str) else list(texts)
        tl = [t.strip() for t in tl if t and t.strip()]
        if not tl:
            raise ValueError("empty text modifier")
        return l2_normalize(self._require_encoder().encode_texts(tl).mean(axis=0))

    def item_vector(self, item_id: int) -> np.ndarray:
        with self.store._pool.connection() as conn:
            row = conn.cursor(binary=True).execute(
                _sql("SELECT embedding FROM {s}.items WHERE id = %s", self.store.schema),
                (int(item_id),)).fetchone()
        if row is None:
            raise KeyError(f"unknown item id(s): [{int(item_id)}]")
        return np.asarray(row[0], np.float32)

    # ----------------------------------------------------------------- snapshot helpers
    def _archive_moments(self, cur: Any) -> tuple[int, ArchiveMoments | None, float]:
        """(n, moments, max_norm) for the snapshot ``cur`` reads, cached per generation."""
        s = self.store.schema
        gen, max_norm = cur.execute(_sql("SELECT generation, max_norm FROM {s}.meta", s)).fetchone()
        with self._mom_lock:
            if self._moments is not None and self._moments[0] == int(gen):
                return self._moments[2], self._moments[1], float(max_norm)
        row = cur.execute(_sql("SELECT n, sum, sumsq FROM {s}.moments", s)).fetchone()
        d = self.store.dim
        m = Moments(int(row[0]), _unpack(row[1], (d,)), _unpack(row[2], (d, d)))
        am = ArchiveMoments.from_sums(m) if m.n >= 2 else None
        with self._mom_lock:
            self._moments = (int(gen), am, m.n)
        return m.n, am, float(max_norm)

    def _fetch(self, cur: Any, direction: np.ndarray, limit: int, where: str,
               params: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, embeddings) of the ``limit`` items best by inner product with ``direction``
        (cast to the column type), from the HNSW index when the planner picks it."""
        vt = f"{self.store.vec_type}({self.store.dim})"
        cur.execute(_sql(f"SELECT id, embedding FROM {{s}}.items {where} ORDER BY embedding <#> "
                         f"%s::{vt} LIMIT %s", self.store.schema),
                    [*params, _vec_literal(direction), int(limit)])
        rows = cur.fetchall()
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, self.store.dim), np.float32)
        return (np.array([r[0] for r in rows], np.int64),
                np.stack([r[1] for r in rows]).astype(np.float32))

    def _fetch_ids(self, cur: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids ascending, embeddings) of these items."""
        cur.execute(_sql("SELECT id, embedding FROM {s}.items WHERE id = ANY(%s) ORDER BY id",
                         self.store.schema), (ids.tolist(),))
        got = cur.fetchall()
        return (np.array([r[0] for r in got], np.int64),
                np.stack([r[1] for r in got]).astype(np.float32))

    def _dot_err(self, v: np.ndarray, max_norm: float) -> float:
        """Bound on |v·x − (v·x as the index computed it)| for stored ‖x‖ ≤ ``max_norm``: the
        query is cast to the column type (fp16 for halfvec) and pgvector sums in float32."""
        v = np.asarray(v, np.float64)
        nv = float(np.linalg.norm(v))
        unit = v / max(nv, 1e-30)
        q = unit.astype(np.float16 if self.store.vec_type == "halfvec" else np.float32)
        cast = float(np.linalg.norm(unit - q.astype(np.float64)))
        return nv * max_norm * (cast + 2 * self.store.dim * _F32_EPS) * 1.01 + 1e-7

    # ----------------------------------------------------------------- search
    def search_ids(
        self,
        img: np.ndarray | None,
        txt: np.ndarray | None,
        method: str = "weicom",
        lams: Sequence[float] = (0.5,),
        k: int = 20,
        exclude_id: int | None = None,
        where: ItemFilter | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray, CandidateStats]]:
        """Top-k (ids, scores, stats) per λ for one query, all from one database snapshot.

        Scores are those :class:`rscir.search.Searcher` gives for the same vectors; fewer than k
        rows come back only when fewer than k items pass ``where``."""
        check_method(method)
        lams = [check_lam(x) for x in lams]
        if method in NEEDS_IMAGE and img is None:
            raise ValueError(f"method {method!r} needs a query image")
        if method in NEEDS_TEXT and txt is None:
            raise ValueError(f"method {method!r} needs a query text")
        qi = None if img is None or method not in NEEDS_IMAGE else np.asarray(img, np.float32).ravel()
        qt = None if txt is None or method not in NEEDS_TEXT else np.asarray(txt, np.float32).ravel()
        for v in (qi, qt):
            if v is not None and v.shape != (self.store.dim,):
                raise ValueError(f"query vectors must have dim {self.store.dim}, got {v.shape}")
        wsql, wparams = _where_sql(where, exclude_id)
        out = []
        with _db_errors(self.store.uri), self.store._pool.connection() as conn:
            cur = conn.cursor(binary=True)  # the pool's connections read in REPEATABLE READ
            n, am, max_norm = self._archive_moments(cur)
            if n == 0 or k < 1:
                return [(np.zeros(0, np.int64), np.zeros(0), CandidateStats()) for _ in lams]
            stats: tuple[QueryStats | None, QueryStats | None] = (None, None)
            if method == "weicom":
                if am is None:
                    raise ValueError("WeiCom normalization needs an archive of at least 2 items")
                stats = (am.query_stats(qi[None]) if qi is not None else None,
                         am.query_stats(qt[None]) if qt is not None else None)
            exact = self.mode == "exact" or (
                self.mode == "auto" and self._qualifying(cur, n, where, wsql, wparams) <= self.exact_below)
            if not exact:
                cur.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                cur.execute(f"SET LOCAL hnsw.ef_search = {min(1000, max(40, int(self.ef_search)))}")
                cur.execute(f"SET LOCAL hnsw.max_scan_tuples = {max(20000, 8 * self.max_candidates)}")
                if self.mode == "index":
                    cur.execute("SET LOCAL enable_seqscan = off")
            memo: dict[Any, Any] = {}  # what does not depend on λ: the scan, the fixed lists
            for lam in lams:
                if exact:
                    cs = CandidateStats(exact_scan=True)
                    ids, x = self._exact_scan(cur, qi, qt, method, lam, k, stats, max_norm,
                                              wsql, wparams, cs, memo)
                    res = _top(ids, self._rescore(x, qi, qt, method, lam, stats), k) + (cs,)
                else:
                    res = self._one(cur, qi, qt, method, lam, k, stats, max_norm, wsql, wparams,
                                    memo)
                out.append(res)
        return out

    def _qualifying(self, cur: Any, n: int, where: ItemFilter | None, wsql: str,
                    wparams: list[Any]) -> int:
        """Items that pass the filter, counted up to ``exact_below + 1`` (enough to decide)."""
        if where is None or where.is_empty():
            return n  # (less the excluded query item, which does not matter here)
        row = cur.execute(_sql(f"SELECT count(*) FROM (SELECT 1 FROM {{s}}.items {wsql} "
                               "LIMIT %s) AS t", self.store.schema),
                          [*wparams, int(self.exact_below) + 1]).fetchone()
        return int(row[0])

    def _exact_scan(self, cur: Any, qi: np.ndarray | None, qt: np.ndarray | None, method: str,
                    lam: float, k: int, stats: tuple[QueryStats | None, QueryStats | None],
                    max_norm: float, where: str, params: list[Any],
                    cs: CandidateStats, memo: dict[Any, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Every qualifying item's similarities, computed in SQL (float32) once per query (kept
        in ``memo`` for its other λ), fused here; the items that can be in the top k given the
        rounding bound ``delta`` are fetched for re-scoring.

        Why a margin: SQL and numpy sum in different orders. With |f_sql − f| ≤ δ, any item of
        the exact top k has f_sql ≥ (k-th best f_sql) − 2δ, so that set provably holds it."""
        d = self.store.dim
        if "scan" not in memo:
            cols, qparams, errs = [], [], []
            for v in (qi, qt):
                if v is not None:
                    cols.append(f"-(embedding::vector({d}) <#> %s::vector({d}))")
                    qparams.append(_vec_literal(v))
                    errs.append(float(np.linalg.norm(v)) * max_norm * 2 * d * _F32_EPS * 1.01
                                + 1e-7)
            cur.execute(_sql(f"SELECT id, {', '.join(cols)} FROM {{s}}.items {where}",
                             self.store.schema), [*qparams, *params])
            arr = np.array(cur.fetchall(), np.float64).reshape(-1, 1 + len(cols))
            sims = iter(arr[:, 1:].T)
            memo["scan"] = (arr[:, 0].astype(np.int64),
                            next(sims)[None] if qi is not None else None,
                            next(sims)[None] if qt is not None else None, errs)
        ids, si, st, errs = memo["scan"]
        cs.candidates = len(ids)
        if not len(ids):
            return np.zeros(0, np.int64), np.zeros((0, d), np.float32)
        f = np.asarray(_fuse(method, si, st, lam, stats), np.float64)[0]
        delta = _fused_err(method, lam, si, st, errs, stats)
        kth = np.partition(f, len(f) - min(k, len(f)))[len(f) - min(k, len(f))]
        keep = ids[f >= kth - 2 * delta]
        return self._fetch_ids(cur, keep)

    def _one(self, cur: Any, qi: np.ndarray | None, qt: np.ndarray | None, method: str,
             lam: float, k: int, stats: tuple[QueryStats | None, QueryStats | None],
             max_norm: float, wsql: str, wparams: list[Any], memo: dict[Any, Any],
             ) -> tuple[np.ndarray, np.ndarray, CandidateStats]:
        """Candidates from the index in growing rounds until a bound proves that no item outside
        them can enter the top k (exact up to the index's recall); else an exact scan."""
        cs = CandidateStats()
        si_st, ti_st = stats
        # the directions whose top lists hold the answer
        if method == "product":  # both factors may be negative: no single direction bounds it
            dirs: list[np.ndarray] = []
        elif method == "image" or (method == "weicom" and lam == 0.0):
            dirs = [qi]
        elif method == "text" or (method == "weicom" and lam == 1.0):
            dirs = [qt]
        elif method in ("sum", "average"):
            dirs = [qi + qt]
        else:  # weicom, 0 < λ < 1: the image list, the text list and the fused linear direction
            sd_i = float(np.where(si_st.std > 0, si_st.std, 1.0)[0, 0])
            sd_t = float(np.where(ti_st.std > 0, ti_st.std, 1.0)[0, 0])
            w = (1 - lam) * qi / sd_i + lam * qt / sd_t
            dirs = [qi, qt, w.astype(np.float32)]
        limit = max(k + 16, 2 * k, 32)
        while dirs:
            cs.rounds += 1
            lists = []
            for v in dirs:
                unit = v / max(float(np.linalg.norm(v)), 1e-12)
                key = (unit.tobytes(), limit)  # the image and text lists serve every λ
                if key not in memo:
                    memo[key] = self._fetch(cur, unit, limit, wsql, wparams)
                ids, x = memo[key]
                lists.append((ids, x, v))
            ids = np.concatenate([lst[0] for lst in lists])
            x = np.concatenate([lst[1] for lst in lists])
            ids, first = np.unique(ids, return_index=True)  # sorted by id: ties → lower id
            x = x[first]
            cs.candidates = len(ids)
            if any(len(lst[0]) < limit for lst in lists):
                break  # a list ran dry (filters, scan limit): the exact scan decides
            scores = self._rescore(x, qi, qt, method, lam, stats)
            kth = np.sort(scores)[::-1][k - 1] if len(scores) >= k else -np.inf
            if kth > self._unseen_bound(lists, qi, qt, method, lam, stats, max_norm):
                return _top(ids, scores, k) + (cs,)
            if limit >= self.max_candidates:
                break
            limit = min(limit * 4, self.max_candidates)
        cs.exact_scan = True
        ids, x = self._exact_scan(cur, qi, qt, method, lam, k, stats, max_norm, wsql, wparams, cs,
                                  memo)
        return _top(ids, self._rescore(x, qi, qt, method, lam, stats), k) + (cs,)

    def _rescore(self, x: np.ndarray, qi: np.ndarray | None, qt: np.ndarray | None, method: str,
                 lam: float, stats: tuple[QueryStats | None, QueryStats | None]) -> np.ndarray:
        """Scores exactly as :class:`rscir.search.Searcher` computes them (float32 similarities
        of the stored values, fused with the archive's statistics)."""
        if not len(x):
            return np.zeros(0)
        si = (qi[None] @ x.T) if qi is not None else None
        st = (qt[None] @ x.T) if qt is not None else None
        return np.asarray(_fuse(method, si, st, lam, stats), np.float64)[0]

    def _unseen_bound(self, lists: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                      qi: np.ndarray | None, qt: np.ndarray | None, method: str, lam: float,
                      stats: tuple[QueryStats | None, QueryStats | None],
                      max_norm: float) -> float:
        """The best score any item outside all candidate lists can have: each list is the top
        of its direction v, so such an item has v·x ≤ min over the list (+ rounding)."""
        th = [float((x @ v).min()) + 2 * self._dot_err(v, max_norm) for _, x, v in lists]
        if len(th) == 1:
            if method == "sum":
                return th[0] + 1e-6
            if method == "average":
                return th[0] / 2 + 1e-6
            a = np.array([[th[0]]], np.float64)
            return float(_fuse(method, a, a, lam, stats)[0, 0]) + 1e-6
        si_st, ti_st = stats
        mi, sdi = float(si_st.mean[0, 0]), float(np.where(si_st.std > 0, si_st.std, 1.0)[0, 0])
        mt, sdt = float(ti_st.mean[0, 0]), float(np.where(ti_st.std > 0, ti_st.std, 1.0)[0, 0])
        a_z, b_z = (th[0] - mi) / sdi, (th[1] - mt) / sdt
        line = th[2] - (1 - lam) * mi / sdi - lam * mt / sdt
        return _weicom_bound(a_z, b_z, line, lam) + 1e-6

    def search(
        self,
        image: str | os.PathLike[str] | ImageLike | None = None,
        text: str | Sequence[str] | None = None,
        *,
        item_id: int | None = None,
        lam: float = 0.5,
        k: int = 20,
        method: str = "weicom",
        exclude_query: bool = True,
        where: ItemFilter | None = None,
    ) -> SearchResult:
        """Same call and result as :meth:`rscir.search.Searcher.search`."""
        if image is not None and item_id is not None:
            raise ValueError("give a query image or an item id, not both")
        img = None
        qid = None
        if item_id is not None:
            img, qid = self.item_vector(item_id), int(item_id)
        elif image is not None:
            img, qid = self.image_vector(image)
        texts = [] if text is None else ([text] if isinstance(text, str) else list(text))
        txt = self.text_vector(texts) if texts else None
        ids, scores, _ = self.search_ids(img, txt, method, [lam], k,
                                         exclude_id=qid if exclude_query else None, where=where)[0]
        meta = self.store.items_for_ids(ids.tolist()) if len(ids) else None
        hits = [] if meta is None else [
            Hit(rank=i + 1, id=int(iid), path=str(p), score=float(s),
                label=None if lab is None else str(lab))
            for i, (iid, p, lab, s) in enumerate(zip(meta["id"], meta["path"], meta["label"],
                                                     scores.tolist(), strict=True))
        ]
        return SearchResult(hits=hits, method=method, lam=float(lam), texts=texts, query_id=qid)

    def close(self) -> None:
        self.store.close()


def _fuse(method: str, si: np.ndarray | None, st: np.ndarray | None, lam: float,
          stats: tuple[QueryStats | None, QueryStats | None]) -> np.ndarray:
    if method == "weicom":
        return fuse(method, si, st, lam, img_stats=stats[0], txt_stats=stats[1])
    return fuse(method, si, st, lam)


def _fused_err(method: str, lam: float, si: np.ndarray | None, st: np.ndarray | None,
               errs: list[float], stats: tuple[QueryStats | None, QueryStats | None]) -> float:
    """Bound on how far a fused score can move when each similarity moves by its ``errs``
    entry (image first, then text, for those given), plus float32 rounding of the fusion."""
    it = iter(errs)
    ei = next(it) if si is not None else 0.0
    et = next(it) if st is not None else 0.0
    if method == "image":
        e = ei
    elif method == "text":
        e = et
    elif method == "sum":
        e = ei + et
    elif method == "average":
        e = (ei + et) / 2
    elif method == "product":
        ai = float(np.abs(si).max()) if si is not None and si.size else 0.0
        at = float(np.abs(st).max()) if st is not None and st.size else 0.0
        e = ai * et + at * ei + ei * et
    else:  # weicom: Φ is _PHI_MAX-Lipschitz, z moves by err / std
        sd_i = float(np.where(stats[0].std > 0, stats[0].std, 1.0)[0, 0]) if stats[0] else 1.0
        sd_t = float(np.where(stats[1].std > 0, stats[1].std, 1.0)[0, 0]) if stats[1] else 1.0
        wi, wt = (1.0, 0.0) if lam == 0.0 else (0.0, 1.0) if lam == 1.0 else (1 - lam, lam)
        e = _PHI_MAX * (wi * ei / sd_i + wt * et / sd_t)
    return e + 1e-6


def _top(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k (ids ascending beforehand, so equal scores keep the lower id first)."""
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return ids[order], scores[order]


def open_pg_searcher(uri: str, *, strategy: str = "auto", **model_kwargs: Any) -> PgSearcher:
    """Open a Postgres store read-only together with its model (like :func:`rscir.open_searcher`;
    ``strategy`` maps to a search mode through :data:`PG_MODES`)."""
    from ...api import load_encoder_for_store

    if strategy not in PG_MODES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(PG_MODES)}")
    store = PgStore.open(uri)
    try:
        enc = load_encoder_for_store(store, **model_kwargs)  # type: ignore[arg-type]
    except Exception:
        store.close()
        raise
    return PgSearcher(store, enc, mode=PG_MODES[strategy])


def index_folder_pg(folder: str | os.PathLike[str], uri: str, *, model: str | None = None,
                    arch: str | None = None, checkpoint: str | None = None, device: str = "auto",
                    encoder: Encoder | None = None, dtype: str = "float16", **kwargs: Any) -> Any:
    """`rscir index FOLDER --store postgresql://...`: the embedded pipeline writing to Postgres
    (resume by path/size/mtime, bad-file report, HNSW built at the end)."""
    from ...api import load_encoder_for_store
    from ...encoders.builtin import default_registry
    from ...ingest.images import index_folder

    if encoder is None:
        if model is None and arch is None and PgStore.exists(uri):
            with PgStore.open(uri) as st:
                encoder = load_encoder_for_store(st, checkpoint=checkpoint, device=device)  # type: ignore[arg-type]
        else:
            encoder = default_registry().load(model, arch=arch, checkpoint=checkpoint, device=device)
    store = PgStore.open_or_create(uri, encoder.info, Path(folder).resolve(), dtype=dtype)
    return index_folder(folder, store, encoder, dtype=dtype, **kwargs)  # type: ignore[arg-type]
