"""Composed search over a store: one Searcher, strategies for the top-k."""

from .searcher import BRUTE_MAX, Hit, ItemFilter, Searcher, SearchResult, StreamParams

__all__ = ["BRUTE_MAX", "Hit", "ItemFilter", "SearchResult", "Searcher", "StreamParams"]
