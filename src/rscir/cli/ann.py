"""`rscir build-ann`: build (or rebuild) the FAISS index kept in a store's artifacts."""

from __future__ import annotations

import argparse
import json

from ..errors import InvalidArgumentError


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the rscir parser."""
    p = sub.add_parser(
        "build-ann",
        help="build an ANN index (flat, IVF, HNSW or IVF-PQ) for fast top-k on a store",
        description="Build the store's FAISS index. 'auto' picks flat up to 100k items, IVF "
        "(float16 lists, scanned exactly) up to 5M, IVF-PQ above (compressed codes, d/8 bytes "
        "per vector, whose candidates are re-ranked exactly from the store's memory-mapped "
        "embeddings: 10M × 512 needs ~0.7 GB of RAM); HNSW only on request (fast for image "
        "queries, unreliable for text/composed ones). The index records the store generation; "
        "after the store changes, search refuses it until it is rebuilt.",
    )
    p.add_argument("store", help="store directory")
    p.add_argument("--kind", choices=["auto", "flat", "ivf", "hnsw", "ivfpq"], default="auto")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree")
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--ef-search", type=int, default=64, help="HNSW default search breadth")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~2·sqrt(n))")
    p.add_argument("--pq-m", type=int, default=None,
                   help="PQ sub-quantizers (default: d/8 bytes per vector, d/4 of 4 bits)")
    p.add_argument("--pq-bits", type=int, choices=[4, 8], default=4,
                   help="bits per PQ code: 4 = FastScan (SIMD scan, the default), 8 = classic")
    p.add_argument("--nprobe", type=int, default=None,
                   help="IVF lists probed per search (default 64)")
    p.add_argument("--rerank-factor", type=int, default=4,
                   help="IVF-PQ candidates per wanted neighbour, re-scored exactly")
    p.add_argument("--threads", type=int, default=None, help="FAISS threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--if-stale", action="store_true",
                   help="only build when there is no index or the existing one is stale")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_build_ann)


def cmd_build_ann(a: argparse.Namespace) -> int:
    from ..search.ann import AnnParams, build_index, index_dir, is_stale, read_meta
    from ..stores.directory import DirectoryStore
    from ..stores.uri import open_store

    for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe", "rerank_factor"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be >= 1")
    if a.nlist is not None and a.nlist < 1 or a.pq_m is not None and a.pq_m < 1:
        raise InvalidArgumentError("--nlist and --pq-m must be >= 1")
    store = open_store(a.store)
    if not isinstance(store, DirectoryStore):
        store.close()
        raise InvalidArgumentError(
            f"{store.location} is a {store.backend} store: its index (HNSW) is built by "
            "`rscir index`; build-ann makes FAISS indexes for directory stores")
    if len(store) == 0:
        raise InvalidArgumentError(f"store {a.store} is empty: index some images first")
    if a.pq_m is not None and store.dim % a.pq_m:
        raise InvalidArgumentError(f"--pq-m {a.pq_m} must divide the embedding dimension {store.dim}")
    if a.threads is not None:
        import faiss

        faiss.omp_set_num_threads(max(1, a.threads))
    meta = read_meta(store)
    if a.if_stale and meta is not None and not is_stale(store, meta):
        out = {"built": False, "reason": "up to date", **meta.to_dict()}
    else:
        params = AnnParams(
            hnsw_m=a.hnsw_m, ef_construction=a.ef_construction, ef_search=a.ef_search,
            nlist=a.nlist, pq_m=a.pq_m, pq_bits=a.pq_bits, nprobe=a.nprobe,
            rerank_factor=a.rerank_factor, seed=a.seed,
        )
        idx = build_index(store, a.kind, params)
        out = {"built": True, **idx.meta.to_dict(), "disk_bytes": idx.disk_bytes(index_dir(store))}
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        verb = "built" if out["built"] else "kept (up to date)"
        extra = f" in {out['build_seconds']:.1f}s" if out["built"] else ""
        print(f"{verb} {out['kind']} index over {out['n']} items (generation "
              f"{out['generation']}){extra} -> {index_dir(store)}")
    return 0
