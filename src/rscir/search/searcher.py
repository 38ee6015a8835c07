"""One Searcher for every store: encode the query once, let a strategy find the top-k, build hits.

The searcher owns what every backend shares: query encoding (an archive file or item is looked up,
not re-embedded; texts are cached), the checks of a query, the archive-moments cache (WeiCom's
per-query normalization always comes from the store's moments, O(d²) per query and equal to a
full-archive scan, so it is the same whatever strategy, filter or subset of items is scored),
and turning ids and scores into :class:`Hit` records. *Which* items are scored is the business
of a strategy object (:mod:`.strategy`), picked by name per searcher or per call.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import overload

import numpy as np

from ..caching import LRU
from ..encoders.base import Encoder, ImageLike, l2_normalize
from ..errors import InvalidArgumentError, PathNotFoundError, QueryError
from ..moments import ArchiveMoments
from ..scoring import NEEDS_IMAGE, NEEDS_TEXT, QueryStats, check_lam, check_method, norm_cdf
from ..stores.base import EmbeddingStore
from ..stores.filters import ItemFilter
from .results import META_COLUMNS, Hit, SearchResult, build_hits
from .strategy import (
    ComposedQuery,
    MomentsCache,
    SearchParams,
    SearchStrategy,
    StreamParams,
    TopK,
    check_strategy,
    query_stats,
    strategies_for,
)

QueryImage = str | os.PathLike[str] | ImageLike
BRUTE_MAX = SearchParams().brute_max


def resolve_method(method: str | None, has_image: bool, has_text: bool,
                   lams: Sequence[float] = (0.5,)) -> str:
    """The method a query means (see :meth:`Searcher.search`); errors name Python arguments."""
    if method is None:
        if has_image and has_text:
            return "weicom"
        if has_image:
            return "image"
        if has_text:
            return "text"
        raise QueryError("give a query: image= or item_id= (an image), text= (a modifier), "
                         "or both")
    check_method(method)
    if method == "weicom" and has_image and not has_text and all(x == 0.0 for x in lams):
        return "image"  # λ = 0 is image only
    if method == "weicom" and has_text and not has_image and all(x == 1.0 for x in lams):
        return "text"  # λ = 1 is text only
    if method in NEEDS_IMAGE and not has_image:
        raise QueryError(f"method {method!r} needs a query image: give image= or item_id=")
    if method in NEEDS_TEXT and not has_text:
        raise QueryError(f"method {method!r} needs a text modifier: give text=")
    return method


class Searcher:
    """Answers composed queries on one store with the encoder it was built with.

    ``strategy`` (see :mod:`.strategy`) is the default of every search call, which can override
    it. ``encoder`` may be None to search with vectors only. Thread-safe for searches."""

    def __init__(
        self,
        store: EmbeddingStore,
        encoder: Encoder | None,
        *,
        strategy: str = "auto",
        params: SearchParams | None = None,
        stream: StreamParams | None = None,
        chunk_rows: int | None = None,
        text_cache: int = 512,
    ) -> None:
        if encoder is not None:
            store.check_model(encoder.info)
        p = params or SearchParams()
        if stream is not None:
            p = replace(p, stream=stream)
        if chunk_rows is not None:
            p = replace(p, chunk_rows=int(chunk_rows))
        self.store = store
        self.encoder = encoder
        self.params = p
        self.strategy_name = check_strategy(strategy)
        self._classes = strategies_for(store.backend)
        self._moments = MomentsCache()
        self._strategies: dict[str, SearchStrategy] = {}
        self._lock = threading.Lock()
        self._texts = LRU(text_cache)

    # ----------------------------------------------------------------- query encoding
    def _require_encoder(self) -> Encoder:
        if self.encoder is None:
            raise QueryError("this searcher has no encoder: pass one to embed images or texts")
        return self.encoder

    def encode_image(self, image: ImageLike) -> np.ndarray:
        """Embedding of a decoded query image (PIL or array)."""
        return self._require_encoder().encode_images([image])[0]

    def image_vector(self, image: QueryImage) -> tuple[np.ndarray, int | None]:
        """Embedding of a query image (path, PIL, array) and its item id when it is an
        unchanged archive file (its stored embedding is used, not a new one)."""
        from ..ingest.images import load_image

        if isinstance(image, str | os.PathLike):
            p = Path(image)
            if not p.is_file():
                raise PathNotFoundError(f"query image not found: {p}")
            iid = self._id_of_file(p)
            if iid is not None:
                return self.item_vector(iid), iid
            pil, _ = load_image(p)
            return self.encode_image(pil), None
        return self.encode_image(image), None

    def _id_of_file(self, p: Path) -> int | None:
        root = Path(self.store.root).resolve()
        rp = p.resolve()
        if root not in rp.parents:
            return None
        st = p.stat()
        return self.store.id_of_file(rp.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns)

    def item_vector(self, item_id: int) -> np.ndarray:
        """The stored embedding of an archive item (float32)."""
        return self.store.vectors_for_ids([int(item_id)])[0]

    def text_vector(self, texts: str | Sequence[str]) -> np.ndarray:
        """Several modifiers are averaged in embedding space, then re-normalized (cached)."""
        tl = [texts] if isinstance(texts, str) else list(texts)
        key = tuple(t.strip() for t in tl if t and t.strip())
        if not key:
            raise QueryError("empty text modifier")
        enc = self._require_encoder()
        vec: np.ndarray = self._texts.get_or_make(
            key, lambda: l2_normalize(enc.encode_texts(list(key)).mean(axis=0)))
        return vec

    # ----------------------------------------------------------------- archive state
    def archive_moments(self) -> ArchiveMoments:
        """Mean and covariance of the live embeddings (cached per store generation)."""
        am = self._moments.get(self.store.generation, self.store.moments)
        if am is None:
            raise QueryError("WeiCom normalization needs an archive of at least 2 items")
        return am

    def query_stats(self, img: np.ndarray | None, txt: np.ndarray | None, method: str
                    ) -> tuple[QueryStats | None, QueryStats | None]:
        """Full-archive WeiCom statistics of the queries (None for the other methods)."""
        if method != "weicom":
            return None, None
        q = ComposedQuery.make(img, txt, method)
        return query_stats(self._moments.get(self.store.generation, self.store.moments), q)

    def strategy(self, name: str | None = None) -> SearchStrategy:
        """The strategy object of that name (this searcher's default when None)."""
        name = check_strategy(name or self.strategy_name)
        with self._lock:
            if name not in self._strategies:
                cls = self._classes.get(name)
                if cls is None:
                    raise InvalidArgumentError(
                        f"a {self.store.backend} store offers the strategies "
                        f"{', '.join(sorted(self._classes))}, not {name!r}")
                self._strategies[name] = cls(self.store, self.params, self._moments)
            return self._strategies[name]

    def resolve_strategy(self, name: str | None = None) -> str:
        """The strategy a call will use (``auto`` resolved where the backend decides per call)."""
        s = self.strategy(name)
        resolve = getattr(s, "resolve", None)
        return str(resolve()) if callable(resolve) else s.name

    # ----------------------------------------------------------------- scoring
    def scores(self, img: np.ndarray | None, txt: np.ndarray | None, method: str = "weicom",
               lam: float = 0.5, rows: np.ndarray | None = None) -> np.ndarray:
        """Fused scores (Q, N) for every item in ``store.embeddings`` order (or for the sorted
        ``rows``), WeiCom normalized over the whole archive. A full scan: for tools and tests."""
        from .directory import fused_scores

        check_method(method)
        check_lam(lam)
        return fused_scores(self.store.embeddings, img, txt, method, lam,
                            self.query_stats(img, txt, method), rows, self.params.chunk_rows)

    def search_batch(
        self,
        img: np.ndarray | None,
        txt: np.ndarray | None,
        method: str = "weicom",
        lams: Sequence[float] = (0.5,),
        k: int = 20,
        exclude_ids: Sequence[int | None] | np.ndarray | None = None,
        where: ItemFilter | None = None,
        *,
        strategy: str | None = None,
    ) -> list[TopK]:
        """Top-k of a batch of query vectors for each λ (ids ``-1`` pad queries for which fewer
        than k items qualify). Items in ``exclude_ids`` (one per query) and items failing
        ``where`` are never returned; scores are exact whatever the strategy."""
        lam_list = [check_lam(x) for x in lams]
        if int(k) < 1:
            raise InvalidArgumentError(f"k must be at least 1, got {k}")
        query = ComposedQuery.make(img, txt, method, exclude_ids)
        if query.dim != self.store.dim:
            raise QueryError(f"query vectors have dim {query.dim}, the store holds {self.store.dim}")
        return self.strategy(strategy).search(query, lam_list, int(k), where)

    def search_vectors(
        self,
        img: np.ndarray | None,
        txt: np.ndarray | None,
        method: str = "weicom",
        lam: float = 0.5,
        k: int = 20,
        exclude_ids: Sequence[int | None] | np.ndarray | None = None,
        where: ItemFilter | None = None,
        *,
        strategy: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (ids (Q,k), scores (Q,k)) for one λ; columns are cut to the fewest hits of
        any query, so no padding is ever returned."""
        res = self.search_batch(img, txt, method, [lam], k, exclude_ids, where,
                                strategy=strategy)[0]
        ids, vals = res.ids, res.scores
        keep = ids >= 0
        if not keep.all():
            kk = int(keep.sum(axis=1).min()) if len(ids) else 0
            ids, vals = ids[:, :kk], vals[:, :kk]
        return ids, vals

    def search_ids(
        self,
        img: np.ndarray | None,
        txt: np.ndarray | None,
        method: str = "weicom",
        lams: Sequence[float] = (0.5,),
        k: int = 20,
        exclude_id: int | None = None,
        where: ItemFilter | None = None,
        *,
        strategy: str | None = None,
    ) -> list[TopK]:
        """One query (1-D vectors), every λ: a :class:`TopK` per λ with the padding removed."""
        res = self.search_batch(
            None if img is None else np.asarray(img)[None],
            None if txt is None else np.asarray(txt)[None],
            method, lams, k, [exclude_id], where, strategy=strategy)
        out = []
        for r in res:
            ok = r.ids[0] >= 0
            out.append(TopK(r.ids[0][ok], r.scores[0][ok],
                            None if r.sim_image is None else r.sim_image[0][ok],
                            None if r.sim_text is None else r.sim_text[0][ok]))
        return out

    @overload
    def search(self, image: QueryImage | None = None, text: str | Sequence[str] | None = None,
               *, item_id: int | None = None, lam: float = 0.5, k: int = 20, offset: int = 0,
               method: str | None = None, exclude_query: bool = True,
               where: ItemFilter | None = None, strategy: str | None = None) -> SearchResult: ...

    @overload
    def search(self, image: QueryImage | None = None, text: str | Sequence[str] | None = None,
               *, item_id: int | None = None, lam: Sequence[float], k: int = 20,
               offset: int = 0, method: str | None = None, exclude_query: bool = True,
               where: ItemFilter | None = None, strategy: str | None = None,
               ) -> list[SearchResult]: ...

    def search(
        self,
        image: QueryImage | None = None,
        text: str | Sequence[str] | None = None,
        *,
        item_id: int | None = None,
        lam: float | Sequence[float] = 0.5,
        k: int = 20,
        offset: int = 0,
        method: str | None = None,
        exclude_query: bool = True,
        where: ItemFilter | None = None,
        strategy: str | None = None,
    ) -> SearchResult | list[SearchResult]:
        """One composed query: an image (file, PIL, array) or an archive item id, and/or text.

        ``method`` None picks what the query means: image and text → WeiCom, image only →
        ``image``, text only → ``text`` (WeiCom at λ=0 or 1 ranks as image or text alone, so
        those need only that side). ``lam`` is one λ (a result) or several (a list of results,
        from one encoding). ``offset`` pages: hits ``offset+1 … offset+k``."""
        if image is not None and item_id is not None:
            raise QueryError("give image= or item_id= for the query image, not both")
        if int(k) < 1 or int(offset) < 0:
            raise InvalidArgumentError(f"k must be >= 1 and offset >= 0, got k={k}, "
                                       f"offset={offset}")
        lams = [check_lam(x) for x in (lam if isinstance(lam, Sequence) else [lam])]
        if not lams:
            raise InvalidArgumentError("lam= needs at least one value")
        img_vec: np.ndarray | None = None
        qid: int | None = None
        if item_id is not None:
            img_vec, qid = self.item_vector(item_id), int(item_id)
        elif image is not None:
            img_vec, qid = self.image_vector(image)
        texts = [] if text is None else ([text] if isinstance(text, str) else list(text))
        texts = [t for t in texts if t and t.strip()]
        txt_vec = self.text_vector(texts) if texts else None
        method = resolve_method(method, img_vec is not None, txt_vec is not None, lams)
        res = self.search_ids(img_vec, txt_vec, method, lams, int(k) + int(offset),
                              exclude_id=qid if exclude_query else None, where=where,
                              strategy=strategy)
        out = [SearchResult(hits=self.hits(r, img_vec, txt_vec, method, offset=int(offset)),
                            method=method, lam=lm, texts=texts, query_id=qid,
                            offset=int(offset)) for lm, r in zip(lams, res, strict=True)]
        return out if isinstance(lam, Sequence) else out[0]

    def hits(self, res: TopK, img: np.ndarray | None = None, txt: np.ndarray | None = None,
             method: str = "weicom", *, offset: int = 0) -> list[Hit]:
        """Ranked hits of one query's :class:`TopK` (from ``offset``) with their metadata and
        why they matched (one store lookup for all ids)."""
        ids = res.ids[offset:]
        if not len(ids):
            return []
        meta = self.store.columns_for_ids(ids, META_COLUMNS)
        si = None if res.sim_image is None else res.sim_image[offset:]
        st = None if res.sim_text is None else res.sim_text[offset:]
        ni = nt = None
        if method == "weicom":
            i_st, t_st = self.query_stats(img if si is not None else None,
                                          txt if st is not None else None, method)
            ni = None if si is None or i_st is None else norm_cdf(si[None], i_st)[0]
            nt = None if st is None or t_st is None else norm_cdf(st[None], t_st)[0]
        return build_hits(meta, res.scores[offset:], first_rank=offset + 1, sim_image=si,
                          sim_text=st, norm_image=ni, norm_text=nt)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["BRUTE_MAX", "Hit", "SearchResult", "Searcher", "resolve_method"]
