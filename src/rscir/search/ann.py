"""Approximate nearest-neighbour indexes (FAISS) kept next to a store, for sub-linear top-k.

Four kinds, all by inner product on the L2-normalized embeddings (= cosine similarity):

* ``flat``  — ``IndexFlatIP``: exact, a full scan (BLAS); the reference and the choice for
  small archives.
* ``ivf``   — ``IndexIVFScalarQuantizer`` with float16 codes: k-means lists, ``nprobe`` of them
  scanned exactly (fp16 holds the store's float16 embeddings without loss). The default for
  large archives: the coarse step ranks *every* centroid exactly, so it stays reliable for
  composed and text queries, which lie away from the image embeddings (a modality gap).
* ``hnsw``  — ``IndexHNSWSQ`` with float16 storage: the graph index, fastest for queries that
  look like the archive (image to image). Greedy graph search can get stuck for such
  out-of-distribution queries: on the clustered benchmark archive (benchmarks/scale_search.py,
  100k items) composed WeiCom recall@10 stayed at 0.91–0.95 with efSearch up to 512, and some
  combined-query streams missed their true neighbours even at efSearch 2048; IVF reached 0.997
  at nprobe 32 (at 1M items and 2,000 lists: 0.983 at nprobe 32, 0.991 at 64 with p50 ~10 ms;
  every miss at 64 is a row tied with the k-th exact score).
  So ``auto`` never picks it; ask for it with ``--kind hnsw``.
* ``ivfpq`` — compressed lists for archives whose vectors do not fit in RAM: coarse k-means +
  product quantization, d/8 bytes per vector (64 at d = 512: 0.7 GB of RAM for 10M items,
  ids included), by default 4-bit codes scanned with SIMD (``IndexIVFPQFastScan``; ``pq_bits
  8`` gives the classic ``IndexIVFPQ``). Codes only *pick*
  candidates: ``rerank_factor``× more than asked are re-ranked with exact inner products read
  from the store's memory-mapped embeddings, so a stream is exactly sorted among its
  candidates. On the clustered benchmark archive at 10M items this keeps composed recall@10 at
  the level of the float16 lists at 1M (benchmarks/scale_search.py, README Scale).

``auto`` picks by archive size (:func:`choose_kind`). An index is saved in
``store.artifact_dir("ann")`` with the store generation it was built from; a store written since
(append, supersede, compact — row numbers may change) makes it *stale*: :func:`open_index`
refuses it (or rebuilds when asked), so search never returns rows of another generation.

An :class:`AnnIndex` is a :class:`rscir.search.topk.NeighborSource` (``search(q, depth,
allowed)``). With a row filter (``allowed``) every kind returns only allowed rows (a FAISS
``IDSelectorBitmap``) and searches wider, as pgvector 0.8's iterative scans do: IVF kinds probe
``nprobe / f`` lists for a filter passing a fraction ``f`` of the archive (the k-th allowed
neighbour ranks about ``k / f`` among all items), HNSW widens ``efSearch`` alike, and queries
whose stream is still short are searched again with twice the breadth until every list (or
``ef_search_max``) is covered. :meth:`AnnIndex.filtered_cost` tells a caller when a filter is
so selective that scoring the allowed items exactly is cheaper.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgumentError, PathNotFoundError, StaleIndexError

if TYPE_CHECKING:
    from ..stores.directory import DirectoryStore

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("auto", "flat", "ivf", "hnsw", "ivfpq")
ARTIFACT = "ann"
INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
FLAT_MAX = 100_000
IVF_MAX = 5_000_000  # float16 vectors of 5M × 512 take 5 GB of RAM; compressed codes beyond


def choose_kind(n: int) -> str:
    """Exact scan while it is cheap, exact lists while vectors fit in RAM, compressed beyond."""
    if n <= FLAT_MAX:
        return "flat"
    if n <= IVF_MAX:
        return "ivf"
    return "ivfpq"


@dataclass(frozen=True)
class AnnParams:
    """Build and search settings; ``None`` means "derive from the archive size"."""

    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    ef_search_max: int = 16_384  # filtered HNSW searches widen efSearch up to here
    nlist: int | None = None  # IVF lists; default ~2·√n (ivfpq: at most 4096, see resolved())
    pq_m: int | None = None  # PQ sub-quantizers; default d·8/(8·pq_bits): d/8 bytes per vector
    pq_bits: int = 4  # 4: FastScan (SIMD lookups, fastest scan); 8: classic IndexIVFPQ
    # lists probed; None = 64 (1M items, 2,000 lists: recall@10 0.983 at 32, 0.991 at 64; 10M
    # ivfpq, 4,096 lists: the same recall at 32 and 64, latency within run-to-run noise, and
    # filtered recall lower at 32)
    nprobe: int | None = None
    rerank_factor: int = 4  # ivfpq: candidates per wanted neighbour, re-ranked exactly
    rerank_extra_max: int = 3072  # ... but at most this many more than wanted (deep streams)
    # filtered queries: TA stream depth cap. Their best items lie deeper than unfiltered ones
    # (1M benchmark archive: all of the top-10 within depth 160 unfiltered, up to ~5,000 under
    # a 50% filter); TA's bound stops most queries far earlier
    filter_max_depth: int = 8192
    # unfiltered queries: TA stream depth cap, at least the searcher's; None = by archive
    # size (stream_depth_for): denser archives hold more near-ties of the answer
    stream_depth: int | None = None
    # a filtered search that would read at least this fraction of the index scores the allowed
    # items exactly instead (exact, and cheaper than scanning nearly every list)
    filter_exact_above: float = 1.0
    train_size: int = 65_536  # k-means sample (at least 40 per list)
    kmeans_iters: int = 10  # enough for list assignment; FAISS's 25 triples the build time
    seed: int = 0

    def stream_depth_for(self, n: int) -> int:
        """TA depth cap of unfiltered streams over ``n`` items: 256 up to 5M items (1M
        benchmark archive: recall@10 0.991, 1.000 counting ties), doubling per doubling beyond
        (10M: 512 gives 0.996 counting ties where 256 gave 0.931; scale_search.py)."""
        if self.stream_depth is not None:
            return self.stream_depth
        return 256 * 2 ** max(0, math.ceil(math.log2(max(n, 1) / 5e6)))

    def train_rows(self) -> int:
        """k-means sample size: ``train_size`` but at least 40 points per list."""
        return max(self.train_size, 40 * (self.nlist or 1))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnnParams:
        """Saved parameters; keys of other rscir versions are ignored."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def resolved(self, n: int, d: int, kind: str = "") -> AnnParams:
        """Concrete ``nlist`` and ``pq_m``. ``ivfpq`` caps the default at 4096 lists: compressed
        lists are cheap to scan, while assigning every vector to its list costs build time in
        proportion to ``nlist`` (10M vectors to 6,300 centroids: half again as long)."""
        auto = int(min(max(16, 2 * math.sqrt(max(n, 1))), max(1, n // 39)))
        if kind == "ivfpq":
            auto = min(auto, 4096)
        nlist = self.nlist or auto
        pq_m = self.pq_m or _largest_divisor_at_most(d, max(1, d // self.pq_bits))
        return replace(self, nlist=max(1, nlist), pq_m=pq_m, nprobe=self.probe(kind))

    def probe(self, kind: str = "") -> int:
        """``nprobe``, or its default (the same for every IVF kind so far)."""
        return self.nprobe or 64


def _largest_divisor_at_most(d: int, m: int) -> int:
    for c in range(min(m, d), 0, -1):
        if d % c == 0:
            return c
    return 1


@dataclass(frozen=True)
class IndexMeta:
    kind: str
    generation: int
    n: int
    dim: int
    model_fingerprint: str
    params: dict[str, Any]
    build_seconds: float
    created: float = field(default_factory=time.time)
    faiss_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexMeta:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _faiss() -> Any:
    import faiss

    return faiss


def _add_chunked(index: Any, embeddings: np.ndarray, chunk: int = 1 << 16) -> None:
    for s in range(0, embeddings.shape[0], chunk):
        index.add(np.ascontiguousarray(embeddings[s : s + chunk], dtype=np.float32))


def _ivfpq(faiss: Any, embeddings: np.ndarray, p: AnnParams) -> Any:
    """A trained (empty) IVF-PQ index with 4-bit FastScan or 8-bit codes. No OPQ rotation:
    codes only pick candidates that are re-ranked exactly, and FAISS's OPQ training (an 8-bit
    PQ per iteration) would dominate the build."""
    n, d = embeddings.shape
    nlist, m = p.nlist or 1, p.pq_m or 1
    if p.pq_bits not in (4, 8):
        raise InvalidArgumentError(f"pq_bits must be 4 or 8, got {p.pq_bits}")
    if d % m:
        raise InvalidArgumentError(f"pq_m {m} must divide the embedding dimension {d}")
    if n < 39 * max(nlist, 2**p.pq_bits):
        raise InvalidArgumentError(
            f"ivfpq needs at least {39 * max(nlist, 2**p.pq_bits)} items to train "
            f"(have {n}); use --kind flat or hnsw for this archive"
        )
    metric = faiss.METRIC_INNER_PRODUCT
    quantizer = faiss.IndexFlatIP(d)
    if p.pq_bits == 4:
        ivf = faiss.IndexIVFPQFastScan(quantizer, d, nlist, m, 4, metric)
    else:
        ivf = faiss.IndexIVFPQ(quantizer, d, nlist, m, p.pq_bits, metric)
    ivf.cp.seed = p.seed
    ivf.cp.niter = p.kmeans_iters
    ivf.pq.cp.seed = p.seed
    ivf.train(_training_sample(embeddings, p.train_rows(), p.seed))
    return ivf


def _training_sample(embeddings: np.ndarray, size: int, seed: int) -> np.ndarray:
    n = embeddings.shape[0]
    if n <= size:
        return np.ascontiguousarray(embeddings, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    return np.ascontiguousarray(embeddings[rows], dtype=np.float32)


class AnnIndex:
    """A FAISS index over a store's rows (ids = row numbers of one store generation)."""

    def __init__(self, index: Any, meta: IndexMeta, embeddings: np.ndarray | None = None) -> None:
        self.index = index
        self.meta = meta
        self.embeddings = embeddings  # needed for the exact re-ranking of ivfpq
        self.params = AnnParams.from_dict(meta.params)
        self._sel_lock = threading.Lock()
        self._sel: tuple[Any, np.ndarray, Any, int] | None = None

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    # ----------------------------------------------------------------- build / persist
    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        kind: str = "auto",
        params: AnnParams | None = None,
        *,
        generation: int = 0,
        model_fingerprint: str = "",
    ) -> AnnIndex:
        faiss = _faiss()
        if kind not in KINDS:
            raise InvalidArgumentError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
        n, d = embeddings.shape
        if n == 0:
            raise InvalidArgumentError("cannot build an ANN index over an empty store")
        kind = choose_kind(n) if kind == "auto" else kind
        p = (params or AnnParams()).resolved(n, d, kind)
        t0 = time.perf_counter()
        metric = faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_fp16, p.hnsw_m, metric)
            index.hnsw.efConstruction = p.ef_construction
            index.train(_training_sample(embeddings, 1000, p.seed))  # fp16 needs no statistics
        elif kind == "ivf":
            if n < 39 * (p.nlist or 1):
                raise InvalidArgumentError(
                    f"ivf with {p.nlist} lists needs at least {39 * (p.nlist or 1)} items to train "
                    f"(have {n}); use fewer --nlist or --kind flat for this archive"
                )
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, d, p.nlist, faiss.ScalarQuantizer.QT_fp16, metric
            )
            index.by_residual = False  # fp16 of the vector itself, not of a residual: lossless
            index.cp.seed = p.seed
            index.cp.niter = p.kmeans_iters
            index.train(_training_sample(embeddings, p.train_rows(), p.seed))
        else:
            index = _ivfpq(faiss, embeddings, p)
        _add_chunked(index, embeddings)
        meta = IndexMeta(
            kind=kind,
            generation=int(generation),
            n=int(n),
            dim=int(d),
            model_fingerprint=model_fingerprint,
            params=asdict(p),
            build_seconds=time.perf_counter() - t0,
            faiss_version=str(faiss.__version__),
        )
        return cls(index, meta, embeddings)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write index and meta atomically (temp files + rename; meta last marks it complete)."""
        faiss = _faiss()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex
        tmp_index = d / f".{INDEX_FILE}.{tag}.tmp"
        tmp_meta = d / f".{META_FILE}.{tag}.tmp"
        try:
            faiss.write_index(self.index, str(tmp_index))
            tmp_meta.write_text(json.dumps(self.meta.to_dict(), indent=1))
            (d / META_FILE).unlink(missing_ok=True)  # an index without meta is never trusted
            os.replace(tmp_index, d / INDEX_FILE)
            os.replace(tmp_meta, d / META_FILE)
        finally:
            tmp_index.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)
        return d

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], embeddings: np.ndarray | None = None, *, mmap: bool = False
    ) -> AnnIndex:
        faiss = _faiss()
        d = Path(directory)
        if not (d / META_FILE).is_file() or not (d / INDEX_FILE).is_file():
            raise PathNotFoundError(f"no ANN index in {d} (run `rscir build-ann STORE`)")
        try:
            meta = IndexMeta.from_dict(json.loads((d / META_FILE).read_text()))
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise StaleIndexError(f"ANN index metadata {d / META_FILE} is unreadable ({e}); rebuild it with `rscir build-ann`") from e
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(d / INDEX_FILE), flags)
        if int(index.ntotal) != meta.n or int(index.d) != meta.dim:
            raise StaleIndexError(f"ANN index in {d} does not match its metadata; rebuild it with `rscir build-ann`")
        return cls(index, meta, embeddings)

    def disk_bytes(self, directory: str | os.PathLike[str]) -> int:
        return int((Path(directory) / INDEX_FILE).stat().st_size)

    # ----------------------------------------------------------------- search
    def ivf(self) -> Any:
        """The IVF part of an ivf/ivfpq index, else None."""
        if self.kind not in ("ivf", "ivfpq"):
            return None
        return _faiss().extract_index_ivf(self.index)

    def _selector(self, allowed: np.ndarray) -> tuple[Any, int]:
        """FAISS bitmap selector of an allowed-rows mask and its count, kept for the last mask
        seen (by identity: a searcher passes the same cached mask for every query of a filter;
        masks are never modified in place)."""
        with self._sel_lock:
            hit = self._sel
            if hit is not None and hit[0]() is allowed:
                return hit[2], hit[3]
        if allowed.shape != (self.ntotal,):
            raise InvalidArgumentError(
                f"allowed must be a mask of shape ({self.ntotal},), got {allowed.shape}")
        bitmap = np.packbits(np.asarray(allowed, bool), bitorder="little")
        sel = _faiss().IDSelectorBitmap(self.ntotal, _faiss().swig_ptr(bitmap))
        sel.bitmap_ref = bitmap  # the selector holds a raw pointer: keep the bytes alive with it
        count = int(np.count_nonzero(allowed))
        with self._sel_lock:
            self._sel = (weakref.ref(allowed), bitmap, sel, count)
        return sel, count

    def filtered_cost(self, n_allowed: int) -> float:
        """Fraction of the index a filtered search with ``n_allowed`` rows is expected to scan
        (IVF kinds: the widened ``nprobe`` over ``nlist``; others 0 or 1). At 1 the ANN streams
        would read every list: scoring the allowed items exactly is then both exact and
        cheaper than a full scan of the codes."""
        if self.kind == "flat":
            return 1.0
        ivf = self.ivf()
        if ivf is None or n_allowed <= 0:
            return 0.0
        frac = n_allowed / max(1, self.ntotal)
        return min(1.0, math.ceil(self.params.probe(self.kind) / frac) / int(ivf.nlist))

    def search(self, queries: np.ndarray, depth: int,
               allowed: np.ndarray | None = None) -> np.ndarray:
        """Rows (Q, depth) by decreasing similarity, ``-1`` padded (a NeighborSource); with
        ``allowed`` (N,) bool only allowed rows, searched wider (module docstring)."""
        faiss = _faiss()
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        depth = max(1, min(int(depth), self.ntotal))
        sel, n_ok = (None, self.ntotal) if allowed is None else self._selector(allowed)
        if n_ok == 0:
            return np.full((q.shape[0], depth), -1, np.int64)
        frac = n_ok / self.ntotal
        p = self.params
        if self.kind == "hnsw":
            ef = min(max(p.ef_search_max, depth), math.ceil(max(p.ef_search, depth) / frac))

            def run_hnsw(qs: np.ndarray, breadth: int) -> np.ndarray:
                sp = _search_params(faiss.SearchParametersHNSW, sel, efSearch=breadth)
                return self.index.search(qs, depth, params=sp)[1]

            return self._widen(run_hnsw, q, depth, n_ok, ef, max(p.ef_search_max, depth))
        ivf = self.ivf()
        if ivf is None:  # flat: exact, filtered inside the scan
            sp = _search_params(faiss.SearchParameters, sel)
            return self.index.search(q, depth, params=sp)[1].astype(np.int64)
        nlist = int(ivf.nlist)
        extra = min((max(1, p.rerank_factor) - 1) * depth, p.rerank_extra_max)
        kk = depth if self.kind == "ivf" else min(depth + extra, self.ntotal)

        def run_ivf(qs: np.ndarray, nprobe: int) -> np.ndarray:
            sp = _search_params(faiss.SearchParametersIVF, sel, nprobe=nprobe)
            return self.index.search(qs, kk, params=sp)[1]

        nprobe = min(nlist, math.ceil(p.probe(self.kind) / frac))
        cand = self._widen(run_ivf, q, kk, n_ok, nprobe, nlist)
        if self.kind == "ivf" or self.embeddings is None:  # fp16 lists: already exact
            return cand[:, :depth]
        return rerank(self.embeddings, cand, q, depth)

    @staticmethod
    def _widen(run: Any, q: np.ndarray, want: int, n_ok: int, breadth: int,
               most: int) -> np.ndarray:
        """``run(q, breadth)``, then again with doubled breadth for the queries that found
        fewer than ``want`` rows (of ``n_ok`` allowed), until ``most``: an iterative scan."""
        rows = np.asarray(run(q, breadth), np.int64)
        need = min(want, n_ok)
        todo = np.flatnonzero((rows >= 0).sum(axis=1) < need)
        while todo.size and breadth < most:
            breadth = min(most, breadth * 2)
            rows[todo] = run(np.ascontiguousarray(q[todo]), breadth)
            todo = todo[(rows[todo] >= 0).sum(axis=1) < need]
        return rows


def _search_params(cls: Any, sel: Any, **fields: Any) -> Any:
    """FAISS per-call search parameters of class ``cls`` with an optional ID selector."""
    sp = cls()
    for name, value in fields.items():
        setattr(sp, name, value)
    if sel is not None:
        sp.sel = sel
    return sp


def rerank(embeddings: np.ndarray, cand: np.ndarray, q: np.ndarray, depth: int,
           block: int = 32) -> np.ndarray:
    """The ``depth`` best of each query's candidate rows (``-1`` padded) by exact inner product
    with ``embeddings`` (a float16 memmap: each distinct row of a block of queries is read
    once, in row order)."""
    out = np.full((cand.shape[0], min(depth, cand.shape[1])), -1, np.int64)
    for s in range(0, cand.shape[0], block):
        c = cand[s : s + block]
        valid = c >= 0
        u, inv = np.unique(np.where(valid, c, 0), return_inverse=True)
        x = np.asarray(embeddings[u], np.float32)
        sims = (q[s : s + block] @ x.T)[np.arange(c.shape[0])[:, None], inv.reshape(c.shape)]
        order = np.argsort(-np.where(valid, sims, -np.inf), axis=1, kind="stable")[:, :depth]
        top = np.take_along_axis(c, order, axis=1)
        out[s : s + block] = np.where(np.take_along_axis(valid, order, axis=1), top, -1)
    return out


# --------------------------------------------------------------------------- store integration
def index_dir(store: DirectoryStore) -> Path:
    return store.artifact_dir(ARTIFACT)


def read_meta(store: DirectoryStore) -> IndexMeta | None:
    """The saved index's metadata, or None when the store has no ANN index."""
    f = store.local_dir / "artifacts" / ARTIFACT / META_FILE
    if not f.is_file():
        return None
    try:
        return IndexMeta.from_dict(json.loads(f.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError):
        return None


def is_stale(store: DirectoryStore, meta: IndexMeta) -> bool:
    return (
        meta.generation != store.generation
        or meta.n != len(store)
        or meta.dim != store.dim
        or meta.model_fingerprint != store.manifest.model.fingerprint
    )


def build_index(
    store: DirectoryStore, kind: str = "auto", params: AnnParams | None = None, *, save: bool = True
) -> AnnIndex:
    """Build an ANN index over the store's live rows and save it in the store's artifacts."""
    idx = AnnIndex.build(
        store.embeddings,
        kind,
        params,
        generation=store.generation,
        model_fingerprint=store.manifest.model.fingerprint,
    )
    if save:
        idx.save(index_dir(store))
    return idx


def open_index(store: DirectoryStore, *, rebuild_stale: bool = False, mmap: bool = False) -> AnnIndex:
    """Load the store's ANN index; a stale one raises :class:`StaleIndexError` unless
    ``rebuild_stale``, which rebuilds it with the same kind and parameters."""
    meta = read_meta(store)
    if meta is None:
        raise PathNotFoundError(f"store {store.path} has no ANN index (run `rscir build-ann`)")
    if is_stale(store, meta):
        if not rebuild_stale:
            raise StaleIndexError(
                f"the ANN index of {store.path} was built at generation {meta.generation} "
                f"({meta.n} items) but the store is at generation {store.generation} "
                f"({len(store)} items); rebuild it with `rscir build-ann {store.path}`"
            )
        log.info("rebuilding stale ANN index of %s", store.path)
        return build_index(store, meta.kind, AnnParams.from_dict(meta.params))
    return AnnIndex.load(index_dir(store), store.embeddings, mmap=mmap)
