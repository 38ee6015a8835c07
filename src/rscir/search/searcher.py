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
from ..scoring import (
    METHODS,
    FusionOptions,
    MethodSpec,
    PreparedQueries,
    QueryStats,
    TextBasisCache,
    archive_similarities,
    check_lam,
    fuse_prepared,
    method_spec,
    norm_cdf,
    prepare_queries,
    topk,
)
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
    exclusions,
    query_stats,
    strategies_for,
)

QueryImage = str | os.PathLike[str] | ImageLike
BRUTE_MAX = SearchParams().brute_max


def resolve_method(method: str | None, has_image: bool, has_text: bool,
                   lams: Sequence[float] = (0.5,)) -> str:
    """The method a query means (see :meth:`Searcher.search`); errors name Python arguments.
    Any name of :mod:`rscir.scoring.methods` (a preset or ``FUSION+transform...``) is valid."""
    if method is None:
        if has_image and has_text:
            return "weicom"
        if has_image:
            return "image"
        if has_text:
            return "text"
        raise QueryError("give a query: image= or item_id= (an image), text= (a modifier), "
                         "or both")
    spec = method_spec(method)
    if method == "weicom" and has_image and not has_text and all(x == 0.0 for x in lams):
        return "image"  # λ = 0 is image only
    if method == "weicom" and has_text and not has_image and all(x == 1.0 for x in lams):
        return "text"  # λ = 1 is text only
    if spec.needs_image and not has_image:
        raise QueryError(f"method {method!r} needs a query image: give image= or item_id=")
    if spec.needs_text and not has_text:
        raise QueryError(f"method {method!r} needs a text modifier: give text=")
    return spec.name


def _add_norms(res: list[TopK], i_st: QueryStats | None, t_st: QueryStats | None) -> None:
    """WeiCom's normalized similarities Φ(z) of the hits (z over the whole archive)."""
    for r in res:
        if r.sim_image is not None and i_st is not None:
            r.norm_image = np.where(np.isnan(r.sim_image), np.nan, norm_cdf(
                np.nan_to_num(r.sim_image), i_st))
        if r.sim_text is not None and t_st is not None:
            r.norm_text = np.where(np.isnan(r.sim_text), np.nan, norm_cdf(
                np.nan_to_num(r.sim_text), t_st))


# what each fusion adds for a per-query offset of the used similarities (q'·x − offset)
_OFFSET_WEIGHTS = {"image": (1.0, 0.0), "text": (0.0, 1.0), "sum": (1.0, 1.0),
                   "average": (0.5, 0.5), "weicom": (0.0, 0.0)}


def _apply_offsets(res: list[TopK], fusion: str, oi: np.ndarray | None,
                   ot: np.ndarray | None) -> None:
    """Strategies score ``q'·x``; the method's similarities are ``q'·x − offset`` (centring):
    shift the scores and similarities by their per-query constants (ranks do not change)."""
    wi, wt = _OFFSET_WEIGHTS[fusion]
    for r in res:
        shift = np.zeros((r.scores.shape[0], 1))
        if oi is not None:
            shift += wi * oi
            if r.sim_image is not None:
                r.sim_image = r.sim_image - oi
        if ot is not None:
            shift += wt * ot
            if r.sim_text is not None:
                r.sim_text = r.sim_text - ot
        r.scores = np.where(np.isfinite(r.scores), r.scores - shift, r.scores)


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
        fusion: FusionOptions | None = None,
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
        self.fusion = fusion or FusionOptions()  # word lists, query expansion depth, ...
        self._bases = TextBasisCache()

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
            if self._require_encoder().wants_bands == "all":  # every band, as items were read
                from ..ingest.render import query_bands

                return self.encode_image(query_bands(self.store, p)), None
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

        method_spec(method)
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
        ``where`` are never returned; scores are exact whatever the strategy.

        Any method of :mod:`rscir.scoring.methods` works: the original fusions go straight to
        the strategy; methods with query transforms (centring, projection, query expansion)
        prepare the query vectors first and then use the strategy when their fused score stays
        a monotone function of two inner products (``ta_capable``); the rest (``minmax``,
        ``harris``, ``basic``) need every item's similarities and are scored by an exact scan,
        whatever ``strategy`` says."""
        lam_list = [check_lam(x) for x in lams]
        if int(k) < 1:
            raise InvalidArgumentError(f"k must be at least 1, got {k}")
        spec = method_spec(method)
        for v in (img, txt):
            if v is not None and np.atleast_2d(v).shape[-1] != self.store.dim:
                raise QueryError(f"query vectors have dim {np.atleast_2d(v).shape[-1]}, the "
                                 f"store holds {self.store.dim}")
        if not spec.transforms and spec.fusion in METHODS:  # the original methods
            query = ComposedQuery.make(img, txt, spec.fusion, exclude_ids)
            res = self.strategy(strategy).search(query, lam_list, int(k), where)
            if spec.fusion == "weicom":
                i_st, t_st = query_stats(
                    self._moments.get(self.store.generation, self.store.moments), query)
                _add_norms(res, i_st, t_st)
            return res
        prep = self.prepare(spec, img, txt)
        excl = exclusions(exclude_ids, prep.n_queries)
        if spec.ta_capable:
            query = ComposedQuery.make(prep.img, prep.txt, spec.fusion, excl)
            res = self.strategy(strategy).search(query, lam_list, int(k), where)
            _apply_offsets(res, spec.fusion, prep.img_offset, prep.txt_offset)
        else:
            res = self._exact_method(prep, lam_list, int(k), excl, where)
        if spec.fusion == "weicom":
            _add_norms(res, prep.used_stats("img"), prep.used_stats("txt"))
        return res

    def prepare(self, spec: MethodSpec, img: np.ndarray | None, txt: np.ndarray | None,
                ) -> PreparedQueries:
        """A method's transformed queries (centring from the moments, the word-list basis
        from this searcher's text encoder, query expansion over the store's embeddings)."""
        basis = None
        if spec.tcentre or spec.project:
            enc = self._require_encoder()
            basis = self._bases.get(enc.info.fingerprint, enc.encode_texts, self.fusion.objects,
                                    self.fusion.styles if spec.project else None,
                                    alpha=self.fusion.alpha,
                                    n_components=self.fusion.n_components)
        try:
            return prepare_queries(
                spec, img, txt, self.archive_moments(), options=self.fusion, basis=basis,
                embeddings=self.store.embeddings if spec.qe else None)
        except QueryError as e:  # name the arguments as the rest of the searcher does
            raise QueryError(str(e).replace("needs a query image", "needs a query image: give "
                                            "image= or item_id=").replace(
                "needs a query text", "needs a text modifier: give text=")) from None

    def _exact_method(self, prep: PreparedQueries, lams: Sequence[float], k: int,
                      excl: np.ndarray, where: ItemFilter | None) -> list[TopK]:
        """Every item scored (methods normalized by per-query ranges need all of them)."""
        st = self.store
        n = len(st)
        nq = prep.n_queries
        if n == 0:
            return [TopK.empty(nq) for _ in lams]
        k = min(k, n)
        si, sx = archive_similarities(prep, st.embeddings, chunk=self.params.chunk_rows)
        ok = np.ones(n, bool) if where is None or where.is_empty() else \
            where.mask(st.filter_index())
        ids = st.ids
        out = []
        for lam in lams:
            f = np.array(fuse_prepared(prep, si, sx, lam, options=self.fusion), np.float64)
            f[:, ~ok] = -np.inf
            f[(excl[:, None] >= 0) & (ids[None, :] == excl[:, None])] = -np.inf
            idx, vals = topk(f, k)
            good = np.isfinite(vals)
            out.append(TopK(
                np.where(good, ids[idx], -1), np.where(good, vals, -np.inf),
                None if si is None else np.where(good, np.take_along_axis(si, idx, 1), np.nan),
                None if sx is None else np.where(good, np.take_along_axis(sx, idx, 1), np.nan)))
        return out

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
        return [r.row(0) for r in res]

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
        out = [SearchResult(hits=self.hits(r, offset=int(offset)),
                            method=method, lam=lm, texts=texts, query_id=qid,
                            offset=int(offset)) for lm, r in zip(lams, res, strict=True)]
        return out if isinstance(lam, Sequence) else out[0]

    def hits(self, res: TopK, *, offset: int = 0) -> list[Hit]:
        """Ranked hits of one query's :class:`TopK` (from ``offset``) with their metadata and
        why they matched (one store lookup for all ids)."""
        ids = res.ids[offset:]
        if not len(ids):
            return []

        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[offset:]

        return build_hits(self.store.columns_for_ids(ids, META_COLUMNS), res.scores[offset:],
                          first_rank=offset + 1, sim_image=cut(res.sim_image),
                          sim_text=cut(res.sim_text), norm_image=cut(res.norm_image),
                          norm_text=cut(res.norm_text))

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["BRUTE_MAX", "Hit", "SearchResult", "Searcher", "resolve_method"]
