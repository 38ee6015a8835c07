"""Composed search over a store: encode the query once, score the archive, return top-k hits.

Three strategies give the top-k (all return exact scores):

* ``brute`` — score every item (vectorized, in row chunks so float16 stores are converted a
  slice at a time, image and text queries in one pass). The default for small archives.
* ``exact-stream`` — the threshold algorithm (:mod:`rscir.composed_topk`) over exact sorted
  streams; equals ``brute`` (a reference for the ANN path).
* ``ann`` — the threshold algorithm over the store's FAISS index (``rscir build-ann``); every
  candidate is re-scored exactly, only *which* items are seen is approximate.

``auto`` uses ``ann`` when the store has an up-to-date index and more than ``BRUTE_MAX`` items,
else ``brute``. WeiCom's per-query normalization always comes from the store's moments
(:mod:`rscir.moments`: O(d²) per query, equal to the full-archive scan), so it is the same
whatever strategy, filter or subset of rows is scored.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..encoders.base import Encoder, ImageLike, l2_normalize
from ..moments import ArchiveMoments
from ..scoring import NEEDS_IMAGE, NEEDS_TEXT, QueryStats, check_lam, check_method, fuse, topk
from ..stores.directory import Store
from .ann import AnnIndex, is_stale, open_index, read_meta
from .topk import ExactSource, chunked_similarities, composed_topk

log = logging.getLogger(__name__)

QueryImage = str | os.PathLike[str] | ImageLike
STRATEGIES: tuple[str, ...] = ("auto", "brute", "exact-stream", "ann")
BRUTE_MAX = 50_000  # auto: up to here a full scan takes a few ms, no index needed


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    return strategy


@dataclass(frozen=True)
class StreamParams:
    """Threshold-algorithm settings for the ``exact-stream`` and ``ann`` strategies.

    ``max_depth`` caps how deep approximate ANN streams are read (exact streams, including a
    flat ANN index, are never capped);
    a filter that passes at most ``subset_max`` items is scored exactly on those items instead,
    which is both faster and exact."""

    start_depth: int | None = None
    max_depth: int = 256
    subset_max: int = 20_000


@dataclass(frozen=True)
class ItemFilter:
    """Metadata restrictions on results: any of ``labels`` (matches ``label`` or ``labels``) and
    a lon/lat bounding box ``(min_lon, min_lat, max_lon, max_lat)``. Filtering never changes the
    WeiCom normalization, which is always over the whole archive."""

    labels: tuple[str, ...] = ()
    bbox: tuple[float, float, float, float] | None = None

    def is_empty(self) -> bool:
        return not self.labels and self.bbox is None

    def mask(self, items: pd.DataFrame) -> np.ndarray:
        """Boolean (N,) of items that pass."""
        keep = np.ones(len(items), dtype=bool)
        if self.labels:
            want = set(self.labels)
            single = items["label"].isin(want).to_numpy()
            multi = np.fromiter((bool(want.intersection(v)) for v in items["labels"]), bool, len(items))
            keep &= single | multi
        if self.bbox is not None:
            x0, y0, x1, y1 = self.bbox
            if x0 > x1 or y0 > y1:
                raise ValueError("bbox must be (min_lon, min_lat, max_lon, max_lat)")
            lon, lat = items["lon"].to_numpy(), items["lat"].to_numpy()
            keep &= (lon >= x0) & (lon <= x1) & (lat >= y0) & (lat <= y1)
        return keep


@dataclass(frozen=True)
class Hit:
    rank: int
    id: int
    path: str
    score: float
    label: str | None = None


@dataclass
class SearchResult:
    hits: list[Hit]
    method: str
    lam: float
    texts: list[str] = field(default_factory=list)
    query_id: int | None = None

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(h) for h in self.hits], columns=["rank", "id", "path", "score", "label"])

    def to_records(self) -> list[dict[str, Any]]:
        return [asdict(h) for h in self.hits]


class Searcher:
    """Answers composed queries on one store with the encoder it was built with.

    ``strategy`` (see module docstring) is the default of :meth:`search_vectors`, which can
    override it per call."""

    def __init__(
        self,
        store: Store,
        encoder: Encoder | None,
        *,
        chunk_rows: int = 1 << 16,
        strategy: str = "auto",
        stream: StreamParams | None = None,
    ) -> None:
        if encoder is not None:
            store.check_model(encoder.info)
        self.store = store
        self.encoder = encoder
        self.chunk_rows = chunk_rows
        self.strategy = check_strategy(strategy)
        self.stream = stream or StreamParams()
        self._lock = threading.Lock()
        self._moments: tuple[int, ArchiveMoments] | None = None
        self._index: tuple[int, AnnIndex] | None = None

    # ----------------------------------------------------------------- query encoding
    def _require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise RuntimeError("this searcher has no encoder: pass one to embed images or texts")
        return self.encoder

    def image_vector(self, image: QueryImage) -> tuple[np.ndarray, int | None]:
        """Embedding of a query image (path, PIL, array) and its archive row if it is an item."""
        from ..ingest.images import load_image

        if isinstance(image, str | os.PathLike):
            p = Path(image)
            if not p.is_file():
                raise FileNotFoundError(f"query image not found: {p}")
            row = self._row_of_file(p)
            if row is not None:
                return np.asarray(self.store.embeddings[row], dtype=np.float32), row
            pil, _ = load_image(p)
            return self._require_encoder().encode_images([pil])[0], None
        return self._require_encoder().encode_images([image])[0], None

    def _row_of_file(self, p: Path) -> int | None:
        root = Path(self.store.root).resolve()
        rp = p.resolve()
        if root not in rp.parents:
            return None
        rows = self.store.rows_for_paths([rp.relative_to(root).as_posix()])
        if rows[0] < 0:
            return None
        st = p.stat()
        item = self.store.items.iloc[int(rows[0])]
        # a changed file on disk is not the indexed one: embed it afresh
        if int(item["size"]) != st.st_size or int(item["mtime_ns"]) != st.st_mtime_ns:
            return None
        return int(rows[0])

    def text_vector(self, texts: str | Sequence[str]) -> np.ndarray:
        """Several modifiers are averaged in embedding space, then re-normalized."""
        tl = [texts] if isinstance(texts, str) else list(texts)
        tl = [t.strip() for t in tl if t and t.strip()]
        if not tl:
            raise ValueError("empty text modifier")
        return l2_normalize(self._require_encoder().encode_texts(tl).mean(axis=0))

    # ----------------------------------------------------------------- archive state
    def archive_moments(self) -> ArchiveMoments:
        """Mean and covariance of the live embeddings (cached per store generation)."""
        gen = self.store.generation
        with self._lock:
            if self._moments is None or self._moments[0] != gen:
                self._moments = (gen, ArchiveMoments.from_sums(self.store.moments()))
            return self._moments[1]

    def query_stats(
        self, img: np.ndarray | None, txt: np.ndarray | None, method: str
    ) -> tuple[QueryStats | None, QueryStats | None]:
        """Full-archive WeiCom statistics of the queries (None for the other methods)."""
        if method != "weicom":
            return None, None
        am = self.archive_moments()
        return (
            None if img is None else am.query_stats(img),
            None if txt is None else am.query_stats(txt),
        )

    def ann_index(self) -> AnnIndex:
        """The store's ANN index (loaded once per store generation); refuses a stale one."""
        gen = self.store.generation
        with self._lock:
            if self._index is None or self._index[0] != gen:
                self._index = (gen, open_index(self.store))
            return self._index[1]

    def resolve_strategy(self, strategy: str | None = None) -> str:
        """The strategy a call will use: ``auto`` becomes ``ann`` or ``brute``."""
        strat = check_strategy(strategy or self.strategy)
        if strat != "auto":
            return strat
        if len(self.store) <= BRUTE_MAX:
            return "brute"
        meta = read_meta(self.store)
        if meta is None:
            return "brute"
        if is_stale(self.store, meta):
            log.warning("the ANN index of %s is stale; scanning the archive (run `rscir "
                        "build-ann %s`)", self.store.path, self.store.path)
            return "brute"
        return "ann"

    # ----------------------------------------------------------------- scoring
    def similarities(self, vecs: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Cosine similarities (Q, N) float32 of query vectors against every live item (or the
        given sorted ``rows``)."""
        return chunked_similarities(self.store.embeddings, vecs, self.chunk_rows, rows)

    def _pair_similarities(
        self, img: np.ndarray | None, txt: np.ndarray | None, method: str, rows: np.ndarray | None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Image and text similarities in one pass over the archive (one float16 conversion)."""
        qi = np.atleast_2d(img) if img is not None and method in NEEDS_IMAGE else None
        qt = np.atleast_2d(txt) if txt is not None and method in NEEDS_TEXT else None
        if qi is not None and qt is not None:
            both = self.similarities(np.concatenate([qi, qt]).astype(np.float32), rows)
            return both[: qi.shape[0]], both[qi.shape[0] :]
        return (
            None if qi is None else self.similarities(qi, rows),
            None if qt is None else self.similarities(qt, rows),
        )

    def scores(
        self,
        img: np.ndarray | None,
        txt: np.ndarray | None,
        method: str = "weicom",
        lam: float = 0.5,
        rows: np.ndarray | None = None,
    ) -> np.ndarray:
        """Fused scores (Q, N) for every live item (or (Q, len(rows)) for sorted ``rows``).

        WeiCom is normalized over the whole archive in every case (from the store moments)."""
        check_method(method)
        si, st = self._pair_similarities(img, txt, method, rows)
        i_st, t_st = self.query_stats(
            None if si is None else img, None if st is None else txt, method
        )
        return fuse(method, si, st, lam, img_stats=i_st, txt_stats=t_st)

    def _brute(
        self,
        img: np.ndarray | None,
        txt: np.ndarray | None,
        method: str,
        lam: float,
        k: int,
        exclude_rows: Sequence[int | None] | None,
        rows: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over all items or the sorted ``rows`` subset; -inf marks excluded rows."""
        s = np.array(self.scores(img, txt, method, lam, rows), dtype=np.float64, copy=True)
        if exclude_rows is not None:
            for qi, r in enumerate(exclude_rows):
                if r is None or r < 0:
                    continue
                if rows is None:
                    s[qi, r] = -np.inf
                else:
                    pos = np.searchsorted(rows, r)
                    if pos < len(rows) and rows[pos] == r:
                        s[qi, pos] = -np.inf
        idx, vals = topk(s, k)
        if rows is not None:
            idx = rows[idx]
        return np.where(np.isfinite(vals), idx, -1), vals

    def search_vectors(
        self,
        img: np.ndarray | None,
        txt: np.ndarray | None,
        method: str = "weicom",
        lam: float = 0.5,
        k: int = 20,
        exclude_rows: Sequence[int | None] | None = None,
        where: ItemFilter | None = None,
        *,
        strategy: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (rows (Q,k), scores (Q,k)) for batches of query vectors (either may be None).

        Rows in ``exclude_rows`` (one per query) and rows failing ``where`` are never returned;
        fewer than k rows come back only when fewer than k rows qualify. Scores are exact
        whatever the strategy."""
        check_method(method)
        check_lam(lam)
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if method in NEEDS_IMAGE and img is None:
            raise ValueError(f"method {method!r} needs a query image")
        if method in NEEDS_TEXT and txt is None:
            raise ValueError(f"method {method!r} needs a query text")
        nq = np.atleast_2d(img if img is not None else txt).shape[0]
        if len(self.store) == 0:
            return np.zeros((nq, 0), np.int64), np.zeros((nq, 0), np.float64)
        k = min(int(k), len(self.store))  # every path then returns the same width
        strat = self.resolve_strategy(strategy)
        mask = None if where is None or where.is_empty() else where.mask(self.store.items)
        subset = None if mask is None else np.flatnonzero(mask)
        if strat == "brute" or (subset is not None and len(subset) <= self.stream.subset_max):
            rows, vals = self._brute(img, txt, method, lam, k, exclude_rows, subset)
        else:
            rows, vals = self._streams(img, txt, method, lam, k, exclude_rows, mask, strat)
            # the capped ANN streams may hold fewer than k qualifying items: score those exactly
            n_ok = len(self.store) if subset is None else len(subset)
            want = np.full(nq, min(k, n_ok))
            if exclude_rows is not None:
                for qi, r in enumerate(exclude_rows):
                    if r is not None and r >= 0 and (mask is None or mask[r]):
                        want[qi] = min(k, n_ok - 1)
            short = np.flatnonzero((rows >= 0).sum(axis=1) < want)
            if short.size:
                sel = (
                    None if exclude_rows is None else [exclude_rows[i] for i in short.tolist()]
                )
                rows[short], vals[short] = self._brute(
                    None if img is None else np.atleast_2d(img)[short],
                    None if txt is None else np.atleast_2d(txt)[short],
                    method, lam, k, sel, subset,
                )
        keep = rows >= 0
        if not keep.all():  # never return an excluded or filtered row
            kk = int(keep.sum(axis=1).min())
            rows, vals = rows[:, :kk], vals[:, :kk]
        return rows, vals

    def _streams(
        self,
        img: np.ndarray | None,
        txt: np.ndarray | None,
        method: str,
        lam: float,
        k: int,
        exclude_rows: Sequence[int | None] | None,
        mask: np.ndarray | None,
        strat: str,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by the threshold algorithm over exact or ANN streams (-1 / -inf padded)."""
        qi = None if img is None else np.atleast_2d(np.asarray(img, np.float32))
        qt = None if txt is None else np.atleast_2d(np.asarray(txt, np.float32))
        i_st, t_st = self.query_stats(qi, qt, method)
        x = self.store.embeddings
        start = self.stream.start_depth
        if strat == "ann":
            source: Any = self.ann_index()
            # a flat index gives exact streams: TA certifies its answer, so no cap is needed
            max_depth: int | None = None if source.kind == "flat" else self.stream.max_depth
            if start is None and source.kind != "hnsw":
                # a list or full scan costs the same at any depth: read once
                start = self.stream.max_depth
        else:
            source, max_depth = ExactSource(x, self.chunk_rows), None
        res = composed_topk(
            x, qi, qt, method, lam, k, source=source, img_stats=i_st, txt_stats=t_st,
            exclude_rows=exclude_rows, allowed=mask, start_depth=start, max_depth=max_depth,
        )
        return res.rows.copy(), res.scores.copy()

    def search(
        self,
        image: QueryImage | None = None,
        text: str | Sequence[str] | None = None,
        *,
        item_id: int | None = None,
        lam: float = 0.5,
        k: int = 20,
        method: str = "weicom",
        exclude_query: bool = True,
        where: ItemFilter | None = None,
    ) -> SearchResult:
        """One composed query: an image (file, PIL, array) or an archive item id, plus text."""
        if image is not None and item_id is not None:
            raise ValueError("give a query image or an item id, not both")
        img_vec: np.ndarray | None = None
        row: int | None = None
        if item_id is not None:
            row = int(self.store.rows_for_ids([item_id])[0])
            img_vec = np.asarray(self.store.embeddings[row], np.float32)
        elif image is not None:
            img_vec, row = self.image_vector(image)
        texts = [] if text is None else ([text] if isinstance(text, str) else list(text))
        txt_vec = self.text_vector(texts) if texts else None
        if method in NEEDS_IMAGE and img_vec is None:
            raise ValueError(f"method {method!r} needs a query image (--image or --item-id)")
        if method in NEEDS_TEXT and txt_vec is None:
            raise ValueError(f"method {method!r} needs a text modifier (--text)")
        rows, vals = self.search_vectors(
            img_vec[None] if img_vec is not None else None,
            txt_vec[None] if txt_vec is not None else None,
            method,
            lam,
            k,
            exclude_rows=[row] if exclude_query and row is not None else None,
            where=where,
        )
        items = self.store.items
        sel = items.iloc[rows[0]]
        hits = [
            Hit(rank=i + 1, id=int(iid), path=str(p), score=float(v),
                label=None if lab is None else str(lab))
            for i, (iid, p, lab, v) in enumerate(
                zip(sel["id"].tolist(), sel["path"].tolist(), sel["label"].tolist(), vals[0].tolist(),
                    strict=True)
            )
        ]
        qid = int(items["id"].iloc[row]) if row is not None else None
        return SearchResult(hits=hits, method=method, lam=float(lam), texts=texts, query_id=qid)
