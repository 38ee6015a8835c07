"""A store in PostgreSQL with pgvector (≥ 0.8), for archives that many users and processes share.

Layout, inside one schema per store (``?schema=NAME`` in the URI, default ``rscir``)::

    meta      one row: manifest (jsonb: model, dim, dtype, archive root), next_id, generation,
              max_norm (bound on stored norms, for rounding margins), HNSW build parameters
    items     the metadata columns of :mod:`..schema`, embedding halfvec(d) | vector(d),
              an HNSW index (inner product) and metadata indexes
    moments   one row: n, Σx, Σxxᵀ (float64 bytes) over the stored embeddings

Every :meth:`PostgresStore.add` is one transaction that writes the rows, updates the moments and
bumps the generation, so readers (in REPEATABLE READ) always see items and moments that agree.
Its search strategies (SQL scan, HNSW candidate rounds) live in :mod:`rscir.search.postgres`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ...encoders.base import ModelInfo
from ...errors import StoreError, StoreExistsError, StoreLockedError, UnknownItemError
from ...moments import Moments
from ..base import EmbeddingStore
from ..integrity import Problem, RepairReport, VerifyReport
from ..schema import COLUMNS, DTYPES, ITEM_COLUMNS, Column, Manifest, check_dtype, normalize_items
from .pool import Pool, connect, db_errors, sql
from .uri import redact_uri, split_uri
from .wire import make_adapters, pack, unpack

MIN_PGVECTOR = (0, 8, 0)
VEC_TYPE = {"float16": "halfvec", "float32": "vector"}
# COPY's binary types of the metadata columns, in ITEM_COLUMNS order
_COPY_TYPES = {"int64": "int8", "object": "text", "float64": "float8"}


def _copy_type(c: Column) -> str:
    """COPY's binary type of a column: its SQL type's name."""
    for prefix, t in (("text[]", "text[]"), ("integer", "int4"), ("timestamptz", "timestamptz"),
                      ("bytea", "bytea")):
        if c.sql.startswith(prefix):
            return t
    return _COPY_TYPES[c.dtype]


class PostgresStore(EmbeddingStore):
    """An embedding store in a Postgres schema (see module docstring).

    Open with :meth:`open` (read) or :meth:`open_or_create` (write; one writer at a time, held
    by a session advisory lock until :meth:`close`). Readers borrow pooled connections, each
    read in one REPEATABLE READ snapshot."""

    backend: ClassVar[str] = "postgres"
    location_hint: ClassVar[str] = "?schema="

    def __init__(self, uri: str, *, writable: bool = False, pool_size: int = 8,
                 _locked_conn: Any = None) -> None:
        self.uri = uri
        self.conninfo, self.schema = split_uri(uri)
        self.writable = writable
        self._conn = _locked_conn if _locked_conn is not None else connect(uri, self.conninfo)
        self._have_lock = _locked_conn is not None
        self._lock = threading.RLock()
        self.pool = Pool(self.conninfo, pool_size)
        self._cache: dict[str, Any] = {}
        try:
            with db_errors(uri):
                self._open()
        except BaseException:
            self._conn.close()
            raise

    def _open(self) -> None:
        _check_version(self._conn, self.uri)
        make_adapters(self._conn)
        if not _has_store(self._conn, self.schema):
            raise StoreError(
                f"no store at {redact_uri(self.uri)} (schema {self.schema!r}): run "
                "`rscir index FOLDER --store URI` first")
        if self.writable and not self._have_lock:
            self._acquire_lock()
        self._columns = self._present_columns()
        if self.writable and len(self._columns) < len(ITEM_COLUMNS):
            self._add_missing_columns()
        self._conn.commit()
        self._load_meta()

    def _present_columns(self) -> tuple[str, ...]:
        """The metadata columns this store's table has (older stores lack later ones)."""
        rows = self._conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND "
            "table_name = 'items'", (self.schema,)).fetchall()
        have = {r[0] for r in rows}
        return tuple(c for c in ITEM_COLUMNS if c in have)

    def _add_missing_columns(self) -> None:
        """Bring a table written by an older rscir up to :data:`COLUMNS` (no data changes)."""
        for c in COLUMNS:
            if c.name not in self._columns:
                decl = f"{c.name} {c.sql}".replace("{", "{{").replace("}", "}}")
                self._conn.execute(sql("ALTER TABLE {s}.items ADD COLUMN IF NOT EXISTS " + decl,
                                       self.schema))
        self._columns = self._present_columns()

    # ----------------------------------------------------------------- creation / opening
    @classmethod
    def exists(cls, location: str | os.PathLike[str]) -> bool:
        """True when the URI's schema holds a store (False for an empty database)."""
        uri = str(location)
        conninfo, schema = split_uri(uri)
        with db_errors(uri), connect(uri, conninfo) as conn:
            return _has_store(conn, schema)

    @classmethod
    def open(cls, location: str | os.PathLike[str], *, writable: bool = False) -> PostgresStore:
        return cls(str(location), writable=writable)

    @classmethod
    def create(cls, location: str | os.PathLike[str], model: ModelInfo,
               root: str | os.PathLike[str], *, dtype: str = "float16", m: int = 16,
               ef_construction: int = 128) -> PostgresStore:
        """Make the schema and tables of a new, empty store, in one transaction.

        ``m`` and ``ef_construction`` shape the HNSW graph built by :meth:`compact`; 128 (twice
        pgvector's default) gave markedly better recall on clustered embeddings for 1.5× the
        build time (docs/postgres.md)."""
        check_dtype(dtype)
        uri = str(location)
        conninfo, schema = split_uri(uri)
        manifest = Manifest(model=model, dim=model.dim, dtype=dtype, root=str(Path(root).resolve()))
        cols = ", ".join(f"{c.name} {c.sql}" for c in COLUMNS).replace("{", "{{").replace("}", "}}")
        vec = f"{VEC_TYPE[dtype]}({int(model.dim)})"
        conn = connect(uri, conninfo)
        try:
            with db_errors(uri):
                # the writer lock first, on this session: of two creators one creates, the other
                # is told so; the store is handed over still locked
                if not conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                                    (f"rscir:{schema}",)).fetchone()[0]:
                    raise StoreLockedError(f"store {redact_uri(uri)} is being created or written "
                                           "by another process; try again when it is done")
                conn.commit()
                with conn.transaction():
                    _ensure_extension(conn, uri)
                    if _has_store(conn, schema):
                        raise StoreExistsError(
                            f"{redact_uri(uri)} already holds a store; open it instead")
                    for stmt in (
                        "CREATE SCHEMA IF NOT EXISTS {s}",
                        f"CREATE TABLE {{s}}.items ({cols}, embedding {vec} NOT NULL)",
                        "CREATE INDEX ON {s}.items (label)",
                        "CREATE INDEX ON {s}.items USING gin (labels)",
                        "CREATE INDEX ON {s}.items (lon, lat)",
                        "CREATE TABLE {s}.moments (one boolean PRIMARY KEY DEFAULT true CHECK "
                        "(one), n bigint NOT NULL, sum bytea NOT NULL, sumsq bytea NOT NULL)",
                        "CREATE TABLE {s}.meta (one boolean PRIMARY KEY DEFAULT true CHECK (one), "
                        "manifest jsonb NOT NULL, next_id bigint NOT NULL, generation bigint NOT "
                        "NULL, max_norm double precision NOT NULL, hnsw jsonb NOT NULL)",
                    ):
                        conn.execute(sql(stmt, schema))
                    z = Moments.zeros(int(model.dim))
                    conn.execute(sql("INSERT INTO {s}.moments (n, sum, sumsq) VALUES (0, %s, %s)",
                                     schema), (pack(z.sum), pack(z.sumsq)))
                    conn.execute(
                        sql("INSERT INTO {s}.meta (manifest, next_id, generation, max_norm, hnsw) "
                            "VALUES (%s, 0, 0, 0, %s)", schema),
                        (json.dumps(manifest.to_dict()),
                         json.dumps({"m": int(m), "ef_construction": int(ef_construction)})))
        except BaseException:
            conn.close()  # ends the session: releases the lock
            raise
        return cls(uri, writable=True, _locked_conn=conn)

    def _acquire_lock(self) -> None:
        got = self._conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                                 (f"rscir:{self.schema}",)).fetchone()[0]
        if not got:
            raise StoreLockedError(
                f"store {redact_uri(self.uri)} is being written by another process")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()  # ends the session: releases the advisory lock
        self.pool.close()

    # ----------------------------------------------------------------- identity
    @property
    def location(self) -> str:
        return redact_uri(self.uri)

    @property
    def local_dir(self) -> Path:
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
    def path(self) -> Path:
        """Alias of :attr:`local_dir` (where reports go)."""
        return self.local_dir

    @property
    def vec_type(self) -> str:
        return VEC_TYPE[self.dtype]

    # ----------------------------------------------------------------- reading
    def _load_meta(self) -> None:
        with self._lock:
            row = self._conn.execute(
                sql("SELECT manifest, next_id, generation, hnsw FROM {s}.meta", self.schema)
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
        with self._lock, db_errors(self.uri):
            gen = int(self._conn.execute(
                sql("SELECT generation FROM {s}.meta", self.schema)).fetchone()[0])
            self._conn.commit()
            if gen != self._generation:
                self._load_meta()
                return True
            return False

    @property
    def generation(self) -> int:
        return self._generation

    def __len__(self) -> int:
        return len(self.items)

    def query_frame(self, where: str = "", params: Sequence[Any] = ()) -> pd.DataFrame:
        """Item metadata selected by an SQL ``WHERE`` clause (ordered by id)."""
        with db_errors(self.uri), self.pool.connection() as conn:
            rows = conn.execute(sql(f"SELECT {', '.join(self._columns)} FROM {{s}}.items {where} "
                                    "ORDER BY id", self.schema), params).fetchall()
        return _frame(rows, self._columns)

    @property
    def items(self) -> pd.DataFrame:
        """Metadata of all items ordered by id (cached until the generation changes)."""
        if "items" not in self._cache:
            self._cache["items"] = self.query_frame()
        items: pd.DataFrame = self._cache["items"]
        return items

    @property
    def embeddings(self) -> np.ndarray:
        """(N, d) embeddings in ``items`` order, fetched on first use (for tools and tests)."""
        if "emb" not in self._cache:
            with self._lock, db_errors(self.uri):
                cur = self._conn.cursor(binary=True)
                cur.execute(sql("SELECT embedding FROM {s}.items ORDER BY id", self.schema))
                rows = cur.fetchall()
                self._conn.commit()
            dt = DTYPES[self.dtype]
            self._cache["emb"] = (np.stack([r[0] for r in rows]).astype(dt) if rows
                                  else np.zeros((0, self.dim), dt))
        emb: np.ndarray = self._cache["emb"]
        return emb

    def moments(self) -> Moments:
        with self._lock, db_errors(self.uri):
            row = self._conn.execute(
                sql("SELECT n, sum, sumsq FROM {s}.moments", self.schema)).fetchone()
            self._conn.commit()
        d = self.dim
        return Moments(int(row[0]), unpack(row[1], (d,)), unpack(row[2], (d, d)))

    def items_for_ids(self, ids: Sequence[int] | np.ndarray) -> pd.DataFrame:
        """Metadata of these ids, in the order given; UnknownItemError for unknown ids."""
        want = [int(i) for i in np.asarray(ids).ravel()]
        df = self.query_frame("WHERE id = ANY(%s)", (want,))
        idx = pd.Index(df["id"]).get_indexer(want)
        if (idx < 0).any():
            bad = [w for w, i in zip(want, idx, strict=True) if i < 0][:10]
            raise UnknownItemError(f"unknown item id(s): {bad}")
        return df.iloc[idx].reset_index(drop=True)

    def vectors_for_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        want = [int(i) for i in np.asarray(ids).ravel()]
        with db_errors(self.uri), self.pool.connection() as conn:
            got = conn.cursor(binary=True).execute(
                sql("SELECT id, embedding FROM {s}.items WHERE id = ANY(%s)", self.schema),
                (want,)).fetchall()
        by_id = {int(i): e for i, e in got}
        missing = [w for w in want if w not in by_id]
        if missing:
            raise UnknownItemError(f"unknown item id(s): {missing[:10]}")
        if not want:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([np.asarray(by_id[w], np.float32) for w in want])

    def id_of_file(self, rel: str, size: int, mtime_ns: int) -> int | None:
        df = self.query_frame("WHERE path = %s AND size = %s AND mtime_ns = %s",
                              (rel, int(size), int(mtime_ns)))
        return int(df["id"].iloc[0]) if len(df) else None

    def has_hnsw(self) -> bool:
        with self._lock, db_errors(self.uri):
            row = self._conn.execute(
                "SELECT 1 FROM pg_indexes WHERE schemaname = %s AND indexname = "
                "'items_embedding_hnsw'", (self.schema,)).fetchone()
            self._conn.commit()
        return row is not None

    def _info_extra(self) -> dict[str, Any]:
        return {"schema": self.schema, "hnsw": self.has_hnsw()}

    # ----------------------------------------------------------------- writing
    def _add(self, embeddings: np.ndarray, items: pd.DataFrame) -> np.ndarray:
        """Insert rows in one transaction (a known path is replaced and keeps its id); the
        moments and generation change in the same transaction."""
        emb = embeddings
        # an upper bound on stored norms makes the search's rounding margins rigorous
        max_norm = float(np.linalg.norm(emb.astype(np.float64), axis=1).max())
        s = self.schema
        df = items
        with self._lock, db_errors(self.uri), self._conn.transaction():
            cur = self._conn.cursor(binary=True)
            meta = cur.execute(sql("SELECT next_id, generation FROM {s}.meta FOR UPDATE", s)
                               ).fetchone()
            next_id, gen = int(meta[0]), int(meta[1])
            old = cur.execute(sql("SELECT id, path, embedding FROM {s}.items WHERE path = ANY(%s)",
                                  s), (df["path"].tolist(),)).fetchall()
            old_ids = {p: int(i) for i, p, _ in old}
            ids = np.array([old_ids.get(p, -1) for p in df["path"]], np.int64)
            fresh = ids < 0
            ids[fresh] = np.arange(next_id, next_id + int(fresh.sum()))
            df = df.assign(id=ids)
            mom = self._read_moments(cur) + Moments.of(emb)
            if old:
                old_emb = np.stack([e for _, _, e in old]).astype(emb.dtype)
                mom = mom - Moments.of(old_emb)
                cur.execute(sql("DELETE FROM {s}.items WHERE id = ANY(%s)", s),
                            (list(old_ids.values()),))
            self._copy_rows(cur, df, emb)
            cur.execute(sql("UPDATE {s}.moments SET n = %s, sum = %s, sumsq = %s", s),
                        (mom.n, pack(mom.sum), pack(mom.sumsq)))
            cur.execute(sql("UPDATE {s}.meta SET next_id = %s, generation = %s, "
                            "max_norm = greatest(max_norm, %s)", s),
                        (next_id + int(fresh.sum()), gen + 1, max_norm))
        self._load_meta()
        return ids

    def _read_moments(self, cur: Any) -> Moments:
        row = cur.execute(sql("SELECT n, sum, sumsq FROM {s}.moments FOR UPDATE", self.schema)
                          ).fetchone()
        d = self.dim
        return Moments(int(row[0]), unpack(row[1], (d,)), unpack(row[2], (d, d)))

    def _copy_rows(self, cur: Any, df: pd.DataFrame, emb: np.ndarray) -> None:
        cols = ", ".join(ITEM_COLUMNS) + ", embedding"
        types = [_copy_type(c) for c in COLUMNS] + [self.vec_type]
        df = normalize_items(df)
        columns = [_sql_values(c, df[c.name]) for c in COLUMNS]
        with cur.copy(sql(f"COPY {{s}}.items ({cols}) FROM STDIN (FORMAT BINARY)",
                          self.schema)) as cp:
            cp.set_types(types)
            for i in range(len(df)):
                cp.write_row([col[i] for col in columns] + [emb[i]])

    def compact(self) -> None:
        """Finish a bulk load: build the HNSW index if missing (cheaper once than per insert)
        and refresh the planner's statistics."""
        self._require_writable()
        ops = f"{self.vec_type}_ip_ops"
        stmt = ("CREATE INDEX IF NOT EXISTS items_embedding_hnsw ON {s}.items USING hnsw "
                f"(embedding {ops}) WITH (m = {int(self._hnsw['m'])}, "
                f"ef_construction = {int(self._hnsw['ef_construction'])})")
        with self._lock, db_errors(self.uri):
            self._conn.execute(sql(stmt, self.schema))
            self._conn.commit()
            self._conn.autocommit = True
            try:
                self._conn.execute(sql("ANALYZE {s}.items", self.schema))
            finally:
                self._conn.autocommit = False


    # ----------------------------------------------------------------- verify / repair
    @classmethod
    def verify_at(cls, location: str | os.PathLike[str]) -> VerifyReport:
        """Recompute the moments and next id from the rows and compare with what is stored;
        NaN/inf rows (pgvector refuses them on insert, so only a damaged table has them)."""
        with cls.open(location) as st:
            rep = VerifyReport(st.location, items=len(st), segments=1)
            x = np.asarray(st.embeddings, np.float64)
            rep.checked_bytes = int(x.size * np.dtype(st.dtype).itemsize)
            bad = ~np.isfinite(x).all(axis=1)
            if bad.any():
                rep.problems.append(Problem("items", f"{int(bad.sum())} embedding(s) hold NaN "
                                            "or inf", "re-index those items"))
            ref, m = Moments.of(x), st.moments()
            scale = max(1.0, float(np.abs(ref.sumsq).max()))
            if m.n != ref.n or not np.allclose(m.sumsq, ref.sumsq, atol=1e-6 * scale) or \
                    not np.allclose(m.sum, ref.sum, atol=1e-6 * scale):
                rep.problems.append(Problem("moments", f"do not match the {ref.n} rows "
                                            f"(n={m.n})", f"`rscir repair {st.location}`"))
            ids = st.ids
            if len(ids) and int(ids.max()) >= st._next_id:
                rep.problems.append(Problem("meta", f"next_id {st._next_id} is not above the "
                                            f"largest id {int(ids.max())}",
                                            f"`rscir repair {st.location}`"))
            if len(st) and not st.has_hnsw():
                rep.notes.append("no HNSW index yet (`rscir index` builds it at the end)")
        return rep

    @classmethod
    def repair_at(cls, location: str | os.PathLike[str], *, purge: bool = False) -> RepairReport:
        """Recompute moments, next id and the norm bound from the rows (one transaction)."""
        with cls.open(location, writable=True) as st:
            rep = RepairReport(st.location)
            x = np.asarray(st.embeddings)
            mom = Moments.of(x)
            next_id = int(st.ids.max()) + 1 if len(st) else 0
            max_norm = float(np.linalg.norm(x.astype(np.float64), axis=1).max()) if len(x) else 0.0
            s = st.schema
            with st._lock, db_errors(st.uri), st._conn.transaction():
                cur = st._conn.cursor()
                cur.execute(sql("UPDATE {s}.moments SET n = %s, sum = %s, sumsq = %s", s),
                            (mom.n, pack(mom.sum), pack(mom.sumsq)))
                cur.execute(sql("UPDATE {s}.meta SET next_id = greatest(next_id, %s), "
                                "generation = generation + 1, max_norm = %s", s),
                            (next_id, max_norm))
            rep.actions.append(f"recomputed moments over {mom.n} rows, next_id and norm bound")
            if len(st):
                st.compact()
        return rep


def _sql_values(c: Column, values: pd.Series) -> list[Any]:
    """One column's values as psycopg sends them (None for missing)."""
    if c.name == "labels":
        return [[str(x) for x in v] for v in values]
    if c.dtype == "float64":
        return [None if np.isnan(v) else float(v) for v in values.to_numpy(np.float64)]
    if c.dtype == "int64":
        return [int(v) for v in values]
    if c.dtype.startswith("datetime64"):
        return [None if pd.isna(v) else v.to_pydatetime() for v in values]
    return [v if isinstance(v, str | bytes) else None for v in values]


def _has_store(conn: Any, schema: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s)", (f"{schema}.meta",)).fetchone()
    return row is not None and row[0] is not None


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
    _check_version(conn, uri)


def _check_version(conn: Any, uri: str) -> None:
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    if row is None:
        raise StoreError(f"{redact_uri(uri)}: the pgvector extension is not installed "
                         "(CREATE EXTENSION vector; needs pgvector >= 0.8)")
    ver = tuple(int(x) for x in re.findall(r"\d+", row[0])[:3])
    if ver < MIN_PGVECTOR:
        raise StoreError(f"pgvector {row[0]} is too old: rscir needs >= 0.8 (halfvec and "
                         "iterative index scans, so that filtered searches still return k rows)")


def _frame(rows: list[tuple[Any, ...]], columns: Sequence[str] = ITEM_COLUMNS) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(columns))
    if not len(df):
        return normalize_items(pd.DataFrame({"path": pd.Series(dtype=object)}))
    df["labels"] = [list(v) if v is not None else [] for v in df["labels"]]
    for c in ("lon", "lat"):
        df[c] = pd.to_numeric(df[c]).astype("float64")
    return normalize_items(df)
