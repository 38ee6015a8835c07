"""Embedding stores: where embeddings, item metadata and archive moments live."""

from ..moments import Moments
from .directory import DTYPES, ITEM_COLUMNS, Manifest, Store, normalize_items

__all__ = ["DTYPES", "ITEM_COLUMNS", "Manifest", "Moments", "Store", "normalize_items"]
