"""Search strategies of the directory store: exact scan, exact-stream TA and FAISS ANN.

All three return exact scores (float64 dot products with the stored embeddings, fused with the
archive moments); they differ only in which items they look at:

* ``brute`` — score every item (vectorized, in row chunks so float16 memmaps are converted a
  slice at a time, image and text queries in one pass).
* ``exact-stream`` — the threshold algorithm (:mod:`.topk`) over exact sorted streams; equals
  ``brute`` (a reference for the ANN path).
* ``ann`` — the threshold algorithm over the store's FAISS index (``rscir build-ann``); only
  *which* items are seen is approximate, and queries whose capped streams hold fewer than k
  qualifying items are scored exactly.
* ``auto`` — ``ann`` when the store has an up-to-date index and more than
  ``SearchParams.brute_max`` items, else ``brute``.

Filters: a filter passing at most ``StreamParams.subset_max`` items is always scored exactly on
those items. Above that, the streams themselves are filtered (exact streams skip disallowed
rows; the FAISS index searches with a bitmap of allowed rows and widens its search by the
filter's selectivity, see :mod:`.ann`), so the capped ANN streams hold as many allowed
candidates as unfiltered ones and filtered recall matches unfiltered recall; when the widened
search would read at least ``AnnParams.filter_exact_above`` of the index, the allowed items are
scored exactly instead. The mask of a filter is computed once per store generation (an LRU of
recent filters). Row numbers stay inside this module: ids go in and out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ..caching import LRU
from ..scoring import NEEDS_IMAGE, NEEDS_TEXT, QueryStats, fuse, topk
from ..stores.directory import DirectoryStore
from ..stores.filters import ItemFilter
from .ann import AnnIndex, is_stale, open_index, read_meta
from .strategy import (
    ComposedQuery,
    MomentsCache,
    SearchParams,
    SearchStrategy,
    TopK,
    query_stats,
)
from .topk import ExactSource, candidate_similarities, chunked_similarities, composed_topk

log = logging.getLogger(__name__)


def fused_scores(
    embeddings: np.ndarray,
    img: np.ndarray | None,
    txt: np.ndarray | None,
    method: str,
    lam: float,
    stats: tuple[QueryStats | None, QueryStats | None] = (None, None),
    rows: np.ndarray | None = None,
    chunk_rows: int = 1 << 16,
) -> np.ndarray:
    """Fused scores (Q, N) of every row of ``embeddings`` (or (Q, len(rows)) for sorted
    ``rows``), image and text similarities computed in one pass (one float16 conversion).
    WeiCom uses the full-archive ``stats`` whatever rows are scored."""
    qi = np.atleast_2d(img) if img is not None and method in NEEDS_IMAGE else None
    qt = np.atleast_2d(txt) if txt is not None and method in NEEDS_TEXT else None
    si: np.ndarray | None
    st: np.ndarray | None
    if qi is not None and qt is not None:
        both = chunked_similarities(
            embeddings, np.concatenate([qi, qt]).astype(np.float32), chunk_rows, rows)
        si, st = both[: qi.shape[0]], both[qi.shape[0] :]
    else:
        si = None if qi is None else chunked_similarities(embeddings, qi, chunk_rows, rows)
        st = None if qt is None else chunked_similarities(embeddings, qt, chunk_rows, rows)
    return fuse(method, si, st, lam, img_stats=stats[0], txt_stats=stats[1])


class _DirectoryStrategy(SearchStrategy):
    """The shared frame: filters, exclusion, k, ids and hit similarities; subclasses give the
    top rows of one λ (:meth:`_rows`)."""

    store: DirectoryStore
    MASKS: ClassVar[int] = 8  # recent filters whose masks are kept (N bytes each)

    def __init__(self, store: DirectoryStore, params: SearchParams, moments: MomentsCache) -> None:
        super().__init__(store, params, moments)
        self._masks = LRU(self.MASKS)

    def mask(self, where: ItemFilter | None) -> np.ndarray | None:
        """The filter's row mask (None: no filter), cached per store generation: a filter on
        millions of items costs far more than an ANN query to evaluate. Read-only, so the
        same object can key the index's selector cache."""
        if where is None or where.is_empty():
            return None
        st = self.store

        def make() -> np.ndarray:
            m = np.asarray(where.mask(st.filter_index()), bool).copy()
            m.flags.writeable = False
            return m

        # keyed by repr: every field of the filter, even an unhashable list from a caller
        found: np.ndarray = self._masks.get_or_make((st.generation, len(st), repr(where)), make)
        return found

    def search(self, query: ComposedQuery, lams: Sequence[float], k: int,
               where: ItemFilter | None = None) -> list[TopK]:
        st = self.store
        nq = query.nq
        if len(st) == 0:
            return [TopK.empty(nq) for _ in lams]
        k = min(int(k), len(st))  # every path then returns the same width
        mask = self.mask(where)
        excl = self._exclude_rows(query.exclude_ids)
        stats = query_stats(self.moments.get(st.generation, st.moments), query)
        out = []
        for lam in lams:
            rows, vals = self._rows(query, float(lam), k, excl, mask, stats)
            out.append(self._topk(query, rows, vals))
        return out

    def _exclude_rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each excluded id (-1: none, or not in the store)."""
        return self.store.rows_for_ids(ids, strict=False)

    def _topk(self, query: ComposedQuery, rows: np.ndarray, vals: np.ndarray) -> TopK:
        """Ids and the exact image/text similarities of the hits (rows -1 stay padding)."""
        ok = rows >= 0
        ids = np.where(ok, self.store.ids[np.maximum(rows, 0)], -1) if rows.size else rows
        x = self.store.embeddings
        si = st = None
        if query.img is not None:
            si = np.where(ok, candidate_similarities(x, rows, query.img), np.nan)
        if query.txt is not None:
            st = np.where(ok, candidate_similarities(x, rows, query.txt), np.nan)
        return TopK(np.asarray(ids, np.int64), np.asarray(vals, np.float64), si, st)

    def _rows(self, query: ComposedQuery, lam: float, k: int, excl: np.ndarray,
              mask: np.ndarray | None, stats: tuple[QueryStats | None, QueryStats | None],
              ) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _brute(self, query: ComposedQuery, lam: float, k: int, excl: np.ndarray,
               subset: np.ndarray | None,
               stats: tuple[QueryStats | None, QueryStats | None]) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over all rows or the sorted ``subset``; -1 rows where none qualify."""
        x = self.store.scan_embeddings  # float32 when it fits: no per-query conversion
        s = np.array(fused_scores(x, query.img, query.txt, query.method, lam,
                                  stats, subset, self.params.chunk_rows), np.float64, copy=True)
        for qi, r in enumerate(excl.tolist()):
            if r < 0:
                continue
            if subset is None:
                s[qi, r] = -np.inf
            else:
                pos = np.searchsorted(subset, r)
                if pos < len(subset) and subset[pos] == r:
                    s[qi, pos] = -np.inf
        idx, vals = topk(s, k)
        if subset is not None:
            idx = subset[idx]
        return np.where(np.isfinite(vals), idx, -1), vals

    @staticmethod
    def _sub(query: ComposedQuery, sel: np.ndarray) -> ComposedQuery:
        return ComposedQuery(None if query.img is None else query.img[sel],
                             None if query.txt is None else query.txt[sel], query.method,
                             query.exclude_ids[sel])

    @staticmethod
    def _sub_stats(stats: tuple[QueryStats | None, QueryStats | None], sel: np.ndarray,
                   ) -> tuple[QueryStats | None, QueryStats | None]:
        return tuple(  # type: ignore[return-value]  # a pair in, a pair out
            None if s is None else QueryStats(mean=s.mean[sel], std=s.std[sel]) for s in stats)


class ExactScan(_DirectoryStrategy):
    """Score every item (or every item a filter keeps)."""

    name: ClassVar[str] = "brute"

    def _rows(self, query: ComposedQuery, lam: float, k: int, excl: np.ndarray,
              mask: np.ndarray | None, stats: tuple[QueryStats | None, QueryStats | None],
              ) -> tuple[np.ndarray, np.ndarray]:
        subset = None if mask is None else np.flatnonzero(mask)
        return self._brute(query, lam, k, excl, subset, stats)


class ExactStream(_DirectoryStrategy):
    """The threshold algorithm over exact sorted streams (equals :class:`ExactScan`)."""

    name: ClassVar[str] = "exact-stream"

    def _source(self, filtered: bool = False) -> tuple[Any, int | None, int | None]:
        """(neighbour source, max depth, start depth) for an unfiltered or filtered query."""
        return ExactSource(self.store.embeddings, self.params.chunk_rows), None, \
            self.params.stream.start_depth

    def _exact_subset(self, n_allowed: int) -> bool:
        """Score a filter's allowed items exactly rather than by streams."""
        return n_allowed <= self.params.stream.subset_max

    def plan(self, n_allowed: int | None = None) -> str:
        """How a query with a filter passing ``n_allowed`` items (None: no filter) is answered:
        ``exact subset`` or ``streams`` / ``filtered streams`` (for logs and benchmarks)."""
        if n_allowed is None:
            return "streams"
        return "exact subset" if self._exact_subset(n_allowed) else "filtered streams"

    def _rows(self, query: ComposedQuery, lam: float, k: int, excl: np.ndarray,
              mask: np.ndarray | None, stats: tuple[QueryStats | None, QueryStats | None],
              ) -> tuple[np.ndarray, np.ndarray]:
        subset = None if mask is None else np.flatnonzero(mask)
        if subset is not None and self._exact_subset(len(subset)):
            return self._brute(query, lam, k, excl, subset, stats)
        source, max_depth, start = self._source(mask is not None)
        res = composed_topk(
            self.store.embeddings, query.img, query.txt, query.method, lam, k, source=source,
            img_stats=stats[0], txt_stats=stats[1], exclude_rows=excl.tolist(), allowed=mask,
            start_depth=start, max_depth=max_depth)
        rows, vals = res.rows.copy(), res.scores.copy()
        # capped ANN streams may hold fewer than k qualifying items: score those exactly
        n_ok = len(self.store) if subset is None else len(subset)
        want = np.full(query.nq, min(k, n_ok))
        for qi, r in enumerate(excl.tolist()):
            if r >= 0 and (mask is None or mask[r]):
                want[qi] = min(k, n_ok - 1)
        redo = (rows >= 0).sum(axis=1) < want
        if subset is not None and len(subset) <= self.params.stream.fallback_max:
            redo |= ~res.certified  # filtered, stopped by the cap: exact on the allowed items
        short = np.flatnonzero(redo)
        if short.size:
            rows[short], vals[short] = self._brute(
                self._sub(query, short), lam, k, excl[short], subset,
                self._sub_stats(stats, short))
        return rows, vals


class AnnStream(ExactStream):
    """The threshold algorithm over the store's FAISS index (see :mod:`.ann`)."""

    name: ClassVar[str] = "ann"

    def __init__(self, store: DirectoryStore, params: SearchParams, moments: MomentsCache) -> None:
        super().__init__(store, params, moments)
        self._lock = threading.Lock()
        self._index: tuple[int, AnnIndex] | None = None

    def index(self) -> AnnIndex:
        """The store's ANN index (loaded once per store generation); refuses a stale one."""
        gen = self.store.generation
        with self._lock:
            if self._index is None or self._index[0] != gen:
                self._index = (gen, open_index(self.store))
            return self._index[1]

    def _exact_subset(self, n_allowed: int) -> bool:
        """Also when the filtered index search would read most of the index anyway."""
        if super()._exact_subset(n_allowed):
            return True
        idx = self.index()
        return idx.filtered_cost(n_allowed) >= idx.params.filter_exact_above

    def _source(self, filtered: bool = False) -> tuple[Any, int | None, int | None]:
        source = self.index()
        stream = self.params.stream
        # a flat index gives exact streams: TA certifies its answer, so no cap is needed.
        # A filter's best items lie deeper in the streams than unfiltered ones (the answer
        # is further from the query): TA may read them deeper, until its bound stops it
        unfiltered = max(stream.max_depth, source.params.stream_depth_for(source.ntotal))
        max_depth = None if source.kind == "flat" else (
            max(unfiltered, source.params.filter_max_depth) if filtered else unfiltered)
        start = stream.start_depth
        if start is None and source.kind != "hnsw":
            start = unfiltered  # a list or full scan costs the same at any depth
        return source, max_depth, start


class Auto(_DirectoryStrategy):
    """``ann`` when the store has a fresh index and is large, else ``brute``."""

    name: ClassVar[str] = "auto"

    def __init__(self, store: DirectoryStore, params: SearchParams, moments: MomentsCache) -> None:
        super().__init__(store, params, moments)
        self._brute_s = ExactScan(store, params, moments)
        self._ann_s = AnnStream(store, params, moments)

    def resolve(self) -> str:
        """The strategy a call makes now."""
        st = self.store
        if len(st) <= self.params.brute_max:
            return "brute"
        meta = read_meta(st)
        if meta is None:
            return "brute"
        if is_stale(st, meta):
            log.warning("the ANN index of %s is stale; scanning the archive (run `rscir "
                        "build-ann %s`)", st.path, st.path)
            return "brute"
        return "ann"

    def search(self, query: ComposedQuery, lams: Sequence[float], k: int,
               where: ItemFilter | None = None) -> list[TopK]:
        target = self._ann_s if self.resolve() == "ann" else self._brute_s
        return target.search(query, lams, k, where)

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "resolves_to": self.resolve()}


STRATEGIES: dict[str, type[SearchStrategy]] = {
    s.name: s for s in (Auto, ExactScan, ExactStream, AnnStream)
}
