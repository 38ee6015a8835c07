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
* ``ivfpq`` — ``IndexIVFPQ`` (coarse k-means + product quantization, ~d/8 bytes per vector)
  for archives too large for RAM, with **exact re-ranking**: it returns ``rerank_factor``×
  more candidates than asked, which are re-scored with the store's own embeddings.

``auto`` picks by archive size (:func:`choose_kind`). An index is saved in
``store.artifact_dir("ann")`` with the store generation it was built from; a store written since
(append, supersede, compact — row numbers may change) makes it *stale*: :func:`open_index`
refuses it (or rebuilds when asked), so search never returns rows of another generation.

An :class:`AnnIndex` is a :class:`rscir.composed_topk.NeighborSource` (``search(q, depth)``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgumentError, PathNotFoundError, StaleIndexError
from .topk import candidate_similarities

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
    nlist: int | None = None  # IVF lists; default ~2·√n
    pq_m: int | None = None  # PQ sub-quantizers; default d/8 (d/8 bytes per vector)
    pq_bits: int = 8
    nprobe: int = 64  # 1M items, nlist 2000: recall@10 0.983 at 32, 0.991 at 64 (scale_search)
    rerank_factor: int = 4
    train_size: int = 65_536  # k-means sample (at least 40 per list)
    kmeans_iters: int = 10  # enough for list assignment; FAISS's 25 triples the build time
    seed: int = 0

    def train_rows(self) -> int:
        """k-means sample size: ``train_size`` but at least 40 points per list."""
        return max(self.train_size, 40 * (self.nlist or 1))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnnParams:
        """Saved parameters; keys of other rscir versions are ignored."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def resolved(self, n: int, d: int) -> AnnParams:
        nlist = self.nlist or int(min(max(16, 2 * math.sqrt(max(n, 1))), max(1, n // 39)))
        pq_m = self.pq_m or _largest_divisor_at_most(d, max(1, d // 8))
        return replace(self, nlist=max(1, nlist), pq_m=pq_m)


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
        p = (params or AnnParams()).resolved(n, d)
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
            if n < 39 * (p.nlist or 1) or n < 39 * 2**p.pq_bits:
                raise InvalidArgumentError(
                    f"ivfpq needs at least {39 * max(p.nlist or 1, 2**p.pq_bits)} items to train "
                    f"(have {n}); use --kind flat or hnsw for this archive"
                )
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFPQ(quantizer, d, p.nlist, p.pq_m, p.pq_bits, metric)
            index.cp.seed = p.seed
            index.cp.niter = p.kmeans_iters
            index.pq.cp.seed = p.seed
            index.train(_training_sample(embeddings, p.train_rows(), p.seed))
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
    def search(self, queries: np.ndarray, depth: int) -> np.ndarray:
        """Rows (Q, depth) by decreasing similarity, ``-1`` padded (a NeighborSource)."""
        faiss = _faiss()
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        depth = max(1, min(int(depth), self.ntotal))
        p = self.params
        if self.kind == "hnsw":
            sp = faiss.SearchParametersHNSW()
            sp.efSearch = max(p.ef_search, depth)
            _, rows = self.index.search(q, depth, params=sp)
            return rows.astype(np.int64)
        if self.kind == "ivf":  # fp16 codes hold the float16 store exactly: no re-ranking
            sp = faiss.SearchParametersIVF()
            sp.nprobe = min(p.nprobe, int(self.index.nlist))
            _, rows = self.index.search(q, depth, params=sp)
            return rows.astype(np.int64)
        if self.kind == "ivfpq":
            sp = faiss.SearchParametersIVF()
            sp.nprobe = min(p.nprobe, int(self.index.nlist))
            kk = min(depth * max(1, p.rerank_factor), self.ntotal)
            _, cand = self.index.search(q, kk, params=sp)
            cand = cand.astype(np.int64)
            if self.embeddings is None:
                return cand[:, :depth]
            sims = candidate_similarities(self.embeddings, cand, q)
            sims = np.where(cand >= 0, sims, -np.inf)
            order = np.argsort(-sims, axis=1, kind="stable")[:, :depth]
            return np.take_along_axis(cand, order, axis=1)
        _, rows = self.index.search(q, depth)
        return rows.astype(np.int64)


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
