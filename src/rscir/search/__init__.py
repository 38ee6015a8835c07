"""Composed search over a store: one :class:`Searcher`, strategies for the top-k."""

from ..stores.filters import ItemFilter
from .searcher import Hit, Searcher, SearchResult
from .strategy import (
    STRATEGY_NAMES,
    ComposedQuery,
    SearchParams,
    SearchStrategy,
    StreamParams,
    TopK,
    strategies_for,
)

__all__ = [
    "STRATEGY_NAMES",
    "ComposedQuery",
    "Hit",
    "ItemFilter",
    "SearchParams",
    "SearchResult",
    "SearchStrategy",
    "Searcher",
    "StreamParams",
    "TopK",
    "strategies_for",
]
