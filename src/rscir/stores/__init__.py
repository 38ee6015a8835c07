"""Embedding stores: where embeddings, item metadata and archive moments live.

One abstract :class:`EmbeddingStore` and two backends: :class:`DirectoryStore` (a folder of
atomic segments, memory-mapped) and the Postgres/pgvector store (``rscir.stores.postgres``,
imported only for a ``postgresql://`` address). :func:`open_store` picks the backend.
"""

from ..moments import Moments
from .base import EmbeddingStore
from .directory import DirectoryStore
from .filters import ItemFilter
from .schema import COLUMNS, DTYPES, ITEM_COLUMNS, Manifest, normalize_items
from .uri import (
    existing_model,
    is_pg_uri,
    open_or_create_store,
    open_store,
    store_class,
    store_exists,
)

__all__ = [
    "COLUMNS",
    "DTYPES",
    "ITEM_COLUMNS",
    "DirectoryStore",
    "EmbeddingStore",
    "ItemFilter",
    "Manifest",
    "Moments",
    "existing_model",
    "is_pg_uri",
    "normalize_items",
    "open_or_create_store",
    "open_store",
    "store_class",
    "store_exists",
]
