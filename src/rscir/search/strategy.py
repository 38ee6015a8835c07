"""Search strategies: small objects that answer a composed query on one store, by name.

A strategy takes a batch of composed queries (image and/or text vectors and a fusion method),
the λ values, ``k``, a metadata filter and the ids to exclude, and returns ids and exact scores
for each λ. It never encodes, never builds hits and never decides normalization: the
:class:`~rscir.search.searcher.Searcher` does that once for every store. Which strategies exist
depends on the store's backend (its :attr:`~rscir.stores.base.EmbeddingStore.backend`):

* embedded (the directory store) — ``brute`` (exact scan), ``exact-stream`` (threshold algorithm over exact sorted
  streams), ``ann`` (the threshold algorithm over the store's FAISS index), ``auto``;
* postgres — ``brute`` and ``exact-stream`` (the SQL scan), ``ann`` (HNSW candidate rounds),
  ``auto`` (the scan for small or selective queries, HNSW rounds above).

Backends map to the module holding their strategies; that module is imported on first use, so
Postgres support costs nothing (not even psycopg) for a directory store.
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidArgumentError, QueryError
from ..moments import ArchiveMoments, Moments
from ..scoring import NEEDS_IMAGE, NEEDS_TEXT, QueryStats, check_method
from ..stores.base import EmbeddingStore
from ..stores.filters import ItemFilter

STRATEGY_NAMES: tuple[str, ...] = ("auto", "brute", "exact-stream", "ann")
# backend -> module whose STRATEGIES dict maps names to strategy classes
BACKEND_MODULES: dict[str, str] = {
    "embedded": "rscir.search.directory",
    "postgres": "rscir.search.postgres",
}


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGY_NAMES:
        raise InvalidArgumentError(
            f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGY_NAMES)}")
    return strategy


def exclusions(exclude_ids: Sequence[int | None] | np.ndarray | None, nq: int) -> np.ndarray:
    """Per query, the id of an item never to return (``-1``: none)."""
    excl = np.full(nq, -1, np.int64)
    if exclude_ids is not None:
        vals = [-1 if v is None else int(v) for v in exclude_ids]
        if len(vals) != nq:
            raise QueryError(f"{len(vals)} excluded ids for {nq} queries")
        excl[:] = vals
    return excl


@dataclass(frozen=True)
class ComposedQuery:
    """A batch of ``Q`` composed queries: unit image and/or text vectors ``(Q, d)`` (float32),
    the fusion method, and per query the id of an item never to return (``-1``: none)."""

    img: np.ndarray | None
    txt: np.ndarray | None
    method: str
    exclude_ids: np.ndarray

    @classmethod
    def make(cls, img: np.ndarray | None, txt: np.ndarray | None, method: str,
             exclude_ids: Sequence[int | None] | np.ndarray | None = None) -> ComposedQuery:
        """Checked and shaped: vectors the method does not use are dropped."""
        check_method(method)
        if method in NEEDS_IMAGE and img is None:
            raise QueryError(f"method {method!r} needs a query image")
        if method in NEEDS_TEXT and txt is None:
            raise QueryError(f"method {method!r} needs a query text")
        qi = np.atleast_2d(np.asarray(img, np.float32)) if method in NEEDS_IMAGE else None
        qt = np.atleast_2d(np.asarray(txt, np.float32)) if method in NEEDS_TEXT else None
        nq = (qi if qi is not None else qt).shape[0]  # type: ignore[union-attr]  # one is set
        if qi is not None and qt is not None and qi.shape != qt.shape:
            raise QueryError(f"image queries {qi.shape} and text queries {qt.shape} differ")
        return cls(qi, qt, method, exclusions(exclude_ids, nq))

    @property
    def nq(self) -> int:
        ref = self.img if self.img is not None else self.txt
        return 0 if ref is None else int(ref.shape[0])

    @property
    def dim(self) -> int:
        ref = self.img if self.img is not None else self.txt
        return 0 if ref is None else int(ref.shape[1])


@dataclass
class TopK:
    """One λ's answer: ids ``(Q, k)`` (``-1`` pads), exact fused scores (``-inf`` pads), and the
    image and text similarities of each hit (NaN pads; None when the method uses no such side)."""

    ids: np.ndarray
    scores: np.ndarray
    sim_image: np.ndarray | None = None
    sim_text: np.ndarray | None = None
    norm_image: np.ndarray | None = None  # WeiCom: Φ(z) of sim_image in the archive
    norm_text: np.ndarray | None = None

    def row(self, i: int) -> TopK:
        """Query ``i`` alone, padding removed."""
        ok = self.ids[i] >= 0

        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[i][ok]

        return TopK(self.ids[i][ok], self.scores[i][ok], cut(self.sim_image), cut(self.sim_text),
                    cut(self.norm_image), cut(self.norm_text))

    @classmethod
    def empty(cls, nq: int, k: int = 0) -> TopK:
        return cls(np.full((nq, k), -1, np.int64), np.full((nq, k), -np.inf))


@dataclass(frozen=True)
class StreamParams:
    """Threshold-algorithm settings for the ``exact-stream`` and ``ann`` strategies.

    ``max_depth`` caps how deep approximate ANN streams are read (exact streams, including a
    flat ANN index, are never capped); a filter that passes at most ``subset_max`` items is
    scored exactly on those items instead, which is both faster and exact. A filtered query
    whose capped streams could not prove their top-k (the threshold algorithm stopped at the
    cap) is scored exactly on its allowed items when they are at most ``fallback_max``: recall
    is kept at the cost of that query's latency, as pgvector's iterative scans do."""

    start_depth: int | None = None
    max_depth: int = 256
    subset_max: int = 20_000
    fallback_max: int = 1_000_000


@dataclass(frozen=True)
class SearchParams:
    """Per-searcher knobs of every strategy (FAISS-style: search options passed at the call)."""

    chunk_rows: int = 1 << 16
    stream: StreamParams = field(default_factory=StreamParams)
    brute_max: int = 50_000  # directory auto: up to here a scan takes a few ms
    exact_below: int = 20_000  # postgres auto: scan when at most this many items qualify
    ef_search: int = 1000  # postgres HNSW candidate breadth
    max_candidates: int = 4096  # postgres HNSW rounds stop here (then the scan decides)


class MomentsCache:
    """Archive mean and covariance per store generation (shared by a searcher's strategies,
    thread-safe): the per-query WeiCom statistics then cost O(d²) whatever the archive size."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entry: tuple[int, ArchiveMoments | None] | None = None

    def get(self, generation: int, load: Callable[[], Moments]) -> ArchiveMoments | None:
        """The moments of that generation (loading them once); None below two items."""
        with self._lock:
            if self._entry is not None and self._entry[0] == generation:
                return self._entry[1]
        m = load()
        am = ArchiveMoments.from_sums(m) if m.n >= 2 else None
        with self._lock:
            self._entry = (generation, am)
        return am


def query_stats(am: ArchiveMoments | None, query: ComposedQuery,
                ) -> tuple[QueryStats | None, QueryStats | None]:
    """Full-archive WeiCom statistics of the queries (None for the other methods)."""
    if query.method != "weicom":
        return None, None
    if am is None:
        raise QueryError("WeiCom normalization needs an archive of at least 2 items")
    return (None if query.img is None else am.query_stats(query.img),
            None if query.txt is None else am.query_stats(query.txt))


class SearchStrategy(ABC):
    """Answers composed queries on one store (see module docstring)."""

    name: ClassVar[str]

    def __init__(self, store: EmbeddingStore, params: SearchParams, moments: MomentsCache) -> None:
        self.store = store
        self.params = params
        self.moments = moments

    @abstractmethod
    def search(self, query: ComposedQuery, lams: Sequence[float], k: int,
               where: ItemFilter | None = None) -> list[TopK]:
        """Top-``k`` for each λ (exact scores; at most ``k`` columns, padded per query when
        fewer items qualify)."""

    def describe(self) -> dict[str, Any]:
        """What this strategy will do (for logs and benchmarks)."""
        return {"strategy": self.name}


def strategies_for(backend: str) -> dict[str, type[SearchStrategy]]:
    """The strategy classes a backend offers, by name (its module imported on first use)."""
    if backend not in BACKEND_MODULES:
        raise InvalidArgumentError(f"no search strategies for store backend {backend!r}")
    mod = importlib.import_module(BACKEND_MODULES[backend])
    found: dict[str, type[SearchStrategy]] = mod.STRATEGIES
    return found
