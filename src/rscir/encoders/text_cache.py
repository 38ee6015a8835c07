"""A persistent cache of text embeddings, per model, shared by every process of a user.

Query texts repeat ("with boats", "denser", class names), and embedding one is the slowest step
of a cold ``rscir search`` after the imports. Encoders look texts up here first (by the exact
text and the model's fingerprint) and embed only the misses. The cache is one SQLite file
(``$RSCIR_CACHE/text-embeddings.sqlite``, default ``~/.cache/rscir``) in WAL mode, so
concurrent processes read and write it safely; it keeps at most ``RSCIR_TEXT_CACHE_SIZE``
entries (default 20,000, about 30 MB at 384 dimensions), the least recently used going first.
``RSCIR_TEXT_CACHE=0`` turns it off. A cache that cannot be used (read-only home, damaged
file, a lock held too long) is skipped with a debug log line: it never fails an encode.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .base import ModelInfo

log = logging.getLogger("rscir.encoders")

DEFAULT_MAX_ENTRIES = 20_000
FILE_NAME = "text-embeddings.sqlite"
SCHEMA_VERSION = "1"
_SQL_VARS = 500  # texts per IN (...) query, below SQLite's variable limit


def cache_root() -> Path:
    """``$RSCIR_CACHE``, else ``$XDG_CACHE_HOME/rscir``, else ``~/.cache/rscir``."""
    env = os.environ.get("RSCIR_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rscir"


def enabled() -> bool:
    return os.environ.get("RSCIR_TEXT_CACHE", "1").strip().lower() not in ("0", "false", "no",
                                                                             "off")


def max_entries() -> int:
    try:
        return max(1, int(os.environ.get("RSCIR_TEXT_CACHE_SIZE", DEFAULT_MAX_ENTRIES)))
    except ValueError:
        return DEFAULT_MAX_ENTRIES


class TextEmbeddingCache:
    """Embeddings of texts by one model (``model`` is a key naming the model and anything that
    changes its numbers, e.g. the precision), in the SQLite file ``path``."""

    def __init__(self, path: str | os.PathLike[str], model: str, dim: int,
                 max_entries: int = DEFAULT_MAX_ENTRIES, timeout: float = 2.0) -> None:
        self.path = Path(path)
        self.model = model
        self.dim = int(dim)
        self.max_entries = int(max_entries)
        self.timeout = timeout
        self.broken = False  # set after an error: this process stops using the file
        self._ready = False  # schema checked by this process

    @classmethod
    def for_model(cls, info: ModelInfo, variant: str = "") -> TextEmbeddingCache | None:
        """The cache of a model (None when turned off by ``RSCIR_TEXT_CACHE=0``). ``variant``
        tells apart numerics of the same weights (e.g. fp16 on CUDA)."""
        if not enabled():
            return None
        key = "\n".join((info.backend, info.arch, info.fingerprint, str(info.dim), variant))
        model = f"{info.name}:" + hashlib.sha256(key.encode()).hexdigest()[:32]
        return cls(cache_root() / FILE_NAME, model, info.dim, max_entries())

    # ------------------------------------------------------------------ sqlite plumbing
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path, timeout=self.timeout)) as con:
            if not self._ready:  # once per process; every statement is idempotent
                # WAL lets readers and a writer work at once; when another process holds a
                # lock, the switch is left to a later run (the file works in either mode)
                with contextlib.suppress(sqlite3.OperationalError):
                    con.execute("PRAGMA journal_mode=WAL")
                con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
                con.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
                con.execute(
                    "CREATE TABLE IF NOT EXISTS emb (model TEXT NOT NULL, text TEXT NOT NULL, "
                    "vec BLOB NOT NULL, used INTEGER NOT NULL, PRIMARY KEY (model, text))")
                con.execute("CREATE INDEX IF NOT EXISTS emb_used ON emb (used)")
                con.commit()
                self._ready = True
            con.execute("PRAGMA synchronous=NORMAL")
            yield con

    def _guard(self, what: str, fn: Callable[[], object]) -> object:
        if self.broken:
            return None
        try:
            return fn()
        except (sqlite3.Error, OSError) as e:
            self.broken = True
            log.debug("text-embedding cache %s: %s failed (%s); not used by this process",
                      self.path, what, e)
            return None

    # ------------------------------------------------------------------ public API
    def lookup(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached embeddings of those of ``texts`` that are cached (marked as used)."""
        uniq = list(dict.fromkeys(texts))

        def run() -> dict[str, np.ndarray]:
            found: dict[str, np.ndarray] = {}
            with self._connect() as con:
                for i in range(0, len(uniq), _SQL_VARS):
                    part = uniq[i : i + _SQL_VARS]
                    rows = con.execute(
                        f"SELECT text, vec FROM emb WHERE model = ? AND text IN "
                        f"({','.join('?' * len(part))})", (self.model, *part)).fetchall()
                    for text, blob in rows:
                        if len(blob) == 4 * self.dim:
                            found[text] = np.frombuffer(blob, dtype="<f4").copy()
                if found:
                    try:  # recency for eviction; skipped when another process holds the lock
                        con.execute("PRAGMA busy_timeout = 50")
                        con.executemany("UPDATE emb SET used = ? WHERE model = ? AND text = ?",
                                        [(time.time_ns(), self.model, t) for t in found])
                        con.commit()
                    except sqlite3.OperationalError:
                        con.rollback()
            return found

        if not uniq:
            return {}
        out = self._guard("lookup", run)
        return out if isinstance(out, dict) else {}

    def store(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Remember embeddings (rows of ``vectors``), then trim the file to ``max_entries``."""
        vecs = np.ascontiguousarray(vectors, dtype="<f4")
        if vecs.ndim != 2 or vecs.shape[1] != self.dim or len(vecs) != len(texts) or not len(vecs):
            return
        now = time.time_ns()
        rows = [(self.model, t, v.tobytes(), now) for t, v in zip(texts, vecs, strict=True)]

        def run() -> None:
            with self._connect() as con:
                con.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?, ?, ?)", rows)
                (n,) = con.execute("SELECT COUNT(*) FROM emb").fetchone()
                if n > self.max_entries:  # trim to 90%: amortizes the trimming
                    drop = n - int(self.max_entries * 0.9)
                    con.execute("DELETE FROM emb WHERE rowid IN "
                                "(SELECT rowid FROM emb ORDER BY used LIMIT ?)", (drop,))
                con.commit()

        self._guard("store", run)

    def encode(self, texts: Sequence[str], embed: Callable[[list[str]], np.ndarray]
               ) -> np.ndarray:
        """Embeddings of ``texts`` (T, dim): cached ones read, the others made by ``embed``
        (each distinct text once) and remembered."""
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        found = self.lookup(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            made = np.asarray(embed(missing), dtype=np.float32)
            self.store(missing, made)
            found.update(zip(missing, made, strict=True))
        return np.stack([found[t] for t in texts]).astype(np.float32, copy=False)
