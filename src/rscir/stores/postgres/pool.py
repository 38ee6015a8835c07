"""Connections: one for the store's own (writing) session, a small pool for readers."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any

from ...errors import StoreError, missing_dependency
from .uri import redact_uri
from .wire import make_adapters


@contextlib.contextmanager
def db_errors(uri: str) -> Iterator[None]:
    """Database errors (connection lost, missing privileges, bad data) as :class:`StoreError`,
    which the CLI and the server report as clean messages."""
    psycopg = _psycopg()

    try:
        yield
    except psycopg.Error as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoreError(f"{redact_uri(uri)}: {msg}") from e


def _psycopg() -> Any:
    try:
        import psycopg
    except ModuleNotFoundError as e:
        raise missing_dependency("psycopg", "pg", "a postgresql:// store") from e
    return psycopg


def connect(uri: str, conninfo: str) -> Any:
    psycopg = _psycopg()

    try:
        return psycopg.connect(conninfo, autocommit=False, connect_timeout=10)
    except psycopg.Error as e:
        raise StoreError(f"cannot connect to {redact_uri(uri)}: {str(e).strip()}") from e


class Pool:
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
        make_adapters(conn)
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


def sql(template: str, schema: str) -> Any:
    from psycopg import sql

    return sql.SQL(template).format(s=sql.Identifier(schema))
