"""rscir: composed image retrieval (query image + text modifier) for remote-sensing archives.

The public names are imported on first use (PEP 562), so ``import rscir`` and the command line
start without loading torch, pandas or FAISS.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    ModelMismatchError,
    ModelUnavailableError,
    RscirError,
    StoreError,
)

_WHERE = {
    "index": ".api",
    "load_encoder_for_store": ".api",
    "open_searcher": ".api",
    "load_encoder": ".encoders",
    "Hit": ".search",
    "ItemFilter": ".search",
    "SearchResult": ".search",
    "Searcher": ".search",
    "DirectoryStore": ".stores",
    "EmbeddingStore": ".stores",
    "open_store": ".stores",
}

if TYPE_CHECKING:
    from .api import index, load_encoder_for_store, open_searcher
    from .encoders import load_encoder
    from .search import Hit, ItemFilter, Searcher, SearchResult
    from .stores import DirectoryStore, EmbeddingStore, open_store


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)


__all__ = [
    "Hit",
    "ItemFilter",
    "ModelMismatchError",
    "ModelUnavailableError",
    "RscirError",
    "SearchResult",
    "Searcher",
    "DirectoryStore",
    "EmbeddingStore",
    "StoreError",
    "__version__",
    "index",
    "load_encoder",
    "load_encoder_for_store",
    "open_searcher",
    "open_store",
]
