"""Where a store is: the one place that reads a store address's scheme.

A path is a directory store; a ``postgresql://`` (or ``postgres://``) URI is a Postgres store,
whose module (and psycopg) is imported only then.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..encoders.base import ModelInfo
from .base import EmbeddingStore
from .postgres.uri import is_pg_uri

StoreLocation = str | os.PathLike[str]


def store_class(location: StoreLocation) -> type[EmbeddingStore]:
    """The backend class for a store address."""
    if is_pg_uri(location):
        from .postgres.store import PostgresStore

        return PostgresStore
    from .directory import DirectoryStore

    return DirectoryStore


def describe(location: StoreLocation) -> str:
    """The address for messages (a URI without its password)."""
    if is_pg_uri(location):
        from .postgres.uri import redact_uri

        return redact_uri(str(location))
    return str(Path(location))


def open_store(location: StoreLocation, *, writable: bool = False) -> EmbeddingStore:
    """Open the store at a directory or a ``postgresql://`` URI."""
    return store_class(location).open(location, writable=writable)


def store_exists(location: StoreLocation) -> bool:
    """True when the address holds a store (of the backend its scheme names)."""
    return store_class(location).exists(location)


def open_or_create_store(location: StoreLocation, model: ModelInfo, root: StoreLocation, *,
                         dtype: str = "float16") -> EmbeddingStore:
    """Open for appending (model, archive root and dtype checked) or create if absent."""
    return store_class(location).open_or_create(location, model, root, dtype=dtype)


def existing_model(store: StoreLocation | EmbeddingStore) -> ModelInfo | None:
    """The model of an existing store (an address or an open store), else None."""
    if isinstance(store, EmbeddingStore):
        return store.manifest.model
    if not store_exists(store):
        return None
    with open_store(store) as st:
        return st.manifest.model
