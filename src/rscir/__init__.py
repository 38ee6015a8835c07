"""rscir: composed image retrieval (query image + text modifier) for remote-sensing archives."""

__version__ = "0.1.0"

from .api import index, load_encoder_for_store, open_searcher  # noqa: E402
from .encoders import ModelMismatchError, ModelUnavailableError, load_encoder  # noqa: E402
from .search import Hit, Searcher, SearchResult  # noqa: E402
from .store import Store, StoreError  # noqa: E402

__all__ = [
    "Hit",
    "ModelMismatchError",
    "ModelUnavailableError",
    "SearchResult",
    "Searcher",
    "Store",
    "StoreError",
    "__version__",
    "index",
    "load_encoder",
    "load_encoder_for_store",
    "open_searcher",
]
