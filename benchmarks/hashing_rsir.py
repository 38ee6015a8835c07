"""Hashing for remote-sensing image retrieval: mAP / P@k against code length for each hashing
method, bytes per image and query time, next to the float (cosine) baseline measured in the
same run.

Protocol (leave-query-out):
  * a seeded random split puts ``--train-frac`` of the images in a training split; every hasher
    (unsupervised ones too, ignoring labels) is fitted on it; supervised ones (KSH) use its
    labels only;
  * queries are the images of the other split; the archive is *all* images but the query
    itself;
  * single-label relevance: same class; multi-label (UCM multilabels.csv): at least one shared
    label;
  * Hamming distances have many ties: archive columns are shuffled once (seeded) so ties are
    broken at random rather than by file order (which groups classes);
  * ``mc-*``: multi-code hashing, 5 codes per image (whole image + 4 quadrants, each described by
    the same encoder; the classic one at 64 px per quadrant), matched by the sum over query regions of the minimum Hamming distance to
    the item's regions; its bits column is per region, bytes are for all 5 codes;
  * query time: µs per query for a top-100 search, single-threaded: FAISS IndexFlatIP on float32
    for the baseline, IndexBinaryFlat / IndexBinaryMultiHash / IndexBinaryHNSW for codes (their
    P@10 columns show what the approximate indexes lose), brute-force numpy for multi-codes;
    ``P@10 rr`` re-ranks the top-100 Hamming candidates with the float embeddings.

    python benchmarks/hashing_rsir.py --out /tmp/hash-bench            # classic encoder
    python benchmarks/hashing_rsir.py --store /path/to/store --out ...  # any other store
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # the machine is shared: single-threaded, before numpy

import argparse  # noqa: E402
import hashlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rscir.bench.metrics import ranking_metrics  # noqa: E402
from rscir.encoders.base import Encoder  # noqa: E402
from rscir.encoders.classic import ClassicEncoder  # noqa: E402
from rscir.hashing import (  # noqa: E402
    HammingIndex,
    MultiCodeHasher,
    hamming_distances,
    make_hasher,
    multicode_distances,
    rerank,
)
from rscir.stores import DirectoryStore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEED_REFERENCE = (
    "seed (Demir & Bruzzone, UC Merced): kernel supervised LSH mAP 0.557 / 0.594 / 0.630 at "
    "16 / 24 / 32 bits; multi-code hashing recall 65.29% vs 58.74% single code at equal time"
)
CLASSIC_SETS = {  # name -> (image folder, multi-label csv or None)
    "ucm16": ("ucm16/images", None),
    "ucm16-ml": ("ucm16/images", "ucm16/multilabels.csv"),
    "rsscn7": ("rsscn7/images", None),
}
SINGLE_METHODS = ("lsh", "itq", "klsh", "ksh")
TOP = 100


@dataclass
class Dataset:
    name: str
    emb: np.ndarray  # (n, d) float32, L2-normalized
    y: np.ndarray  # (n,) class index, or (n, L) 0/1 multi-labels
    multilabel: bool
    store: DirectoryStore
    encoder_name: str


def shared_data_dir() -> Path:
    env = os.environ.get("RSCIR_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def ensure_classic_store(folder: Path, store_dir: Path, labels_csv: Path | None) -> DirectoryStore:
    """Open the classic-encoder store of ``folder``, indexing it first if it does not exist."""
    if not (store_dir / "manifest.json").exists():
        from rscir.encoders import load_encoder
        from rscir.ingest import index_folder

        print(f"indexing {folder} with the classic encoder into {store_dir} ...", flush=True)
        index_folder(
            folder, store_dir, load_encoder("classic"), labels="folder", labels_csv=labels_csv,
            num_workers=1, progress=False,
        )
    return DirectoryStore.open(store_dir)


def dataset_from_store(name: str, store: DirectoryStore, multilabel: bool) -> Dataset:
    items = store.items
    emb = np.array(store.embeddings, np.float32)  # a copy: the store's memmap is read-only
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    if multilabel:
        lists = items["labels"].tolist()
        vocab = sorted({lab for labs in lists for lab in labs})
        if not vocab:
            raise ValueError(f"{name}: no multi-labels in the store (index with --labels-csv)")
        pos = {lab: i for i, lab in enumerate(vocab)}
        y = np.zeros((len(items), len(vocab)), np.int8)
        rows = [i for i, labs in enumerate(lists) for _ in labs]
        cols = [pos[lab] for labs in lists for lab in labs]
        y[rows, cols] = 1
    else:
        lab = items["label"].astype("string").fillna("")
        if (lab == "").any():
            raise ValueError(f"{name}: {int((lab == '').sum())} items have no class label")
        _, y = np.unique(lab.to_numpy(str), return_inverse=True)
    return Dataset(name, emb, y, multilabel, store, store.manifest.model.name)


def quadrants(image: Image.Image) -> list[Image.Image]:
    w, h = image.size
    return [image.crop(b) for b in
            ((0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h))]


def region_encoder(encoder: Encoder) -> Encoder:
    """The encoder for quadrant crops. For the classic encoder, a copy working at half the
    resolution (64 px instead of 128: a quadrant keeps the pixel density it has in the whole
    image, and the 4 quadrants together cost one whole-image descriptor); same dimensions and
    standardization statistics."""
    if isinstance(encoder, ClassicEncoder):
        d = encoder.descriptor
        return ClassicEncoder(encoder.info.name, descriptor=replace(d, size=d.size // 2))
    return encoder


def region_vectors(ds: Dataset, encoder: Encoder, cache: Path) -> np.ndarray:
    """(n, 5, d): the whole-image embedding and the 4 quadrant embeddings (cached as .npy,
    keyed by the region encoder's fingerprint and the archive's paths)."""
    enc = region_encoder(encoder)
    paths = ds.store.items["path"].tolist()
    key = hashlib.sha256("\n".join([enc.info.fingerprint, *paths]).encode()).hexdigest()[:12]
    f = cache / f"regions-{ds.store.path.name}-{key}.npy"
    if f.exists():
        quad = np.load(f)
    else:
        print(f"encoding 4 quadrants of {len(paths)} images ({enc.info.name}) ...", flush=True)
        quad = np.zeros((len(paths), 4, ds.emb.shape[1]), np.float32)
        for s in range(0, len(paths), 64):  # batches of images; the encoder vectorizes a batch
            crops = []
            for p in paths[s : s + 64]:
                with Image.open(ds.store.resolve_path(p)) as im:
                    crops += quadrants(im.convert("RGB"))
            quad[s : s + 64] = enc.encode_images(crops).reshape(-1, 4, quad.shape[2])
        cache.mkdir(parents=True, exist_ok=True)
        np.save(f, quad)
    return np.concatenate([ds.emb[:, None, :], quad], axis=1)


def evaluate(
    scores: np.ndarray, q_rows: np.ndarray, rel: np.ndarray, perm: np.ndarray, ks: tuple[int, ...]
) -> dict[str, float]:
    """mAP and P@k, leave-query-out, ties broken by the random column permutation ``perm``."""
    s = scores.astype(np.float64, copy=True)
    s[np.arange(len(q_rows)), q_rows] = -np.inf
    m = ranking_metrics(s[:, perm], rel[:, perm], ks)
    return {"mAP": float(m["AP"].mean()), **{f"P@{k}": float(m[f"P@{k}"].mean()) for k in ks}}


def precision_of_rows(rows: np.ndarray, q_rows: np.ndarray, rel: np.ndarray, k: int) -> float:
    """P@k of returned rows (the query itself dropped, −1 = missing counts as a miss)."""
    r = np.where(rows == q_rows[:, None], -1, rows)
    # drop the query: keep the first k non-query entries per row
    keep = np.argsort(r == -1, axis=1, kind="stable")[:, :k]
    r = np.take_along_axis(r, keep, axis=1)
    hit = np.where(r >= 0, np.take_along_axis(rel, np.maximum(r, 0), axis=1), False)
    return float(hit.mean())


def mih_tables(bits: int, n: int) -> int:
    """Number of multi-index hash tables: substrings of about log2(n) bits (Norouzi et al.),
    a divisor of the code length, at most 32 bits each."""
    target = min(max(np.log2(max(n, 2)), 4.0), 32.0)
    subs = [b for b in range(1, min(bits, 32) + 1) if bits % b == 0]
    return bits // min(subs, key=lambda b: (abs(b - target), -b))


def scale_timing(ds: Dataset, a: argparse.Namespace) -> list[dict]:
    """µs/query of top-100 search on a synthetic archive of ``--time-n`` items (the dataset's
    embeddings tiled with Gaussian jitter, re-normalized): float32 flat vs binary flat and
    multi-index hashing, PCA-ITQ codes at each length (cheap to compute for 10⁶ items; a flat
    scan's cost does not depend on the code content, MIH's depends on bucket balance)."""
    rng = np.random.default_rng(a.seed + 1)
    n, d = a.time_n, ds.emb.shape[1]
    src = rng.integers(0, len(ds.emb), n)
    big = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        x = ds.emb[src[s : s + 100_000]] + 0.05 * rng.standard_normal((len(src[s : s + 100_000]), d),
                                                                       dtype=np.float32)
        big[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = ds.emb[rng.choice(len(ds.emb), a.time_queries, replace=False)]
    flat = faiss.IndexFlatIP(d)
    flat.add(big)
    base = {"dataset": ds.name, "encoder": ds.encoder_name, "n": n, "queries": len(q), "train": 0}
    rows = [{**base, "method": "float (cosine)", "bits": 32 * d, "bytes/img": 4 * d,
             "flat µs/q": per_query_us(lambda flat=flat: flat.search(q, TOP), len(q), repeat=2)[0]}]
    del flat
    for bits in a.bits:
        if bits > d:
            continue
        h = make_hasher("itq", bits, random_state=a.seed).fit(ds.emb)
        codes = np.concatenate([h.transform(big[s : s + 100_000]) for s in range(0, n, 100_000)])
        qc = h.transform(q)
        row = {**base, "method": "itq", "bits": bits, "bytes/img": bits // 8}
        for kind in ("flat", "mih"):
            ix = HammingIndex(bits, kind, nhash=mih_tables(bits, n)).add(codes)
            row[f"{kind} µs/q"] = per_query_us(lambda ix=ix, qc=qc: ix.search(qc, TOP), len(q),
                                                  repeat=2)[0]
        rows.append(row)
        print(f"  scale {bits} bits: flat {row['flat µs/q']:.0f} µs/q, mih {row['mih µs/q']:.0f}",
              flush=True)
    return rows


def per_query_us(fn: Callable[[], Any], n_queries: int, repeat: int = 3) -> tuple[float, Any]:
    """Best time per query in µs over ``repeat`` runs, and the last run's result (so the
    timed call need not run again for its output)."""
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return 1e6 * best / n_queries, out


def run_dataset(ds: Dataset, a: argparse.Namespace, regions: np.ndarray | None) -> list[dict]:
    rng = np.random.default_rng(a.seed)
    n = len(ds.emb)
    order = rng.permutation(n)
    n_train = int(round(a.train_frac * n))
    train, test = np.sort(order[:n_train]), np.sort(order[n_train:])
    q_rows = test[: a.max_queries] if a.max_queries else test
    perm = rng.permutation(n)
    if ds.multilabel:
        yb = ds.y.astype(np.float64)
        rel = (yb[q_rows] @ yb.T) > 0
    else:
        rel = ds.y[q_rows][:, None] == ds.y[None, :]
    rel[np.arange(len(q_rows)), q_rows] = False
    ks = tuple(a.k)
    base = {"dataset": ds.name, "encoder": ds.encoder_name, "n": n, "queries": len(q_rows),
            "train": len(train)}
    rows: list[dict] = []

    # float baseline: exact cosine
    emb, q = ds.emb, ds.emb[q_rows]
    flat = faiss.IndexFlatIP(emb.shape[1])
    flat.add(emb)
    m = evaluate(q @ emb.T, q_rows, rel, perm, ks)
    t_float = per_query_us(lambda: flat.search(q, TOP + 1), len(q_rows))[0]
    rows.append({**base, "method": "float (cosine)", "bits": 32 * emb.shape[1],
                 "bytes/img": 4 * emb.shape[1], **m, "flat µs/q": t_float})
    print(f"  float baseline: mAP {m['mAP']:.3f}", flush=True)

    y_train = ds.y[train]
    for method in a.methods:
        for bits in a.bits:
            if method.startswith("mc-"):
                if regions is None:
                    continue
                row = run_multicode(method[3:], bits, regions, train, y_train, q_rows, rel, perm,
                                    ks, a.seed)
                if not row:
                    continue
                rows.append({**base, **row})
                print(f"  {method:6s} {bits:4d} bits/region: mAP {row['mAP']:.3f}", flush=True)
                continue
            if method == "itq" and bits > min(len(train), emb.shape[1]):
                continue  # one principal direction per bit
            t0 = time.perf_counter()
            h = make_hasher(method, bits, random_state=a.seed).fit(emb[train], y_train)
            t_fit = time.perf_counter() - t0
            codes = h.transform(emb)
            qc = codes[q_rows]
            m = evaluate(-hamming_distances(qc, codes), q_rows, rel, perm, ks)
            row = {"method": method, "bits": bits, "bytes/img": bits // 8, **m, "fit s": t_fit}
            idx = HammingIndex(bits, "flat").add(codes)
            row["flat µs/q"], (_, cand) = per_query_us(
                lambda idx=idx, qc=qc: idx.search(qc, TOP + 1), len(q_rows))
            rr, _ = rerank(emb, q, cand, TOP + 1)
            row["P@10 rr"] = precision_of_rows(rr, q_rows, rel, 10)
            for kind in ("mih", "hnsw"):
                ix = HammingIndex(bits, kind, nhash=mih_tables(bits, n)).add(codes)
                row[f"{kind} µs/q"], (_, found) = per_query_us(
                    lambda ix=ix, qc=qc: ix.search(qc, TOP + 1), len(q_rows))
                row[f"P@10 {kind}"] = precision_of_rows(found, q_rows, rel, 10)
            rows.append({**base, **row})
            print(f"  {method:6s} {bits:4d} bits: mAP {m['mAP']:.3f} (fit {t_fit:.1f}s)",
                  flush=True)
    return rows


def run_multicode(base: str, bits: int, regions: np.ndarray, train: np.ndarray,
                  y_train: np.ndarray, q_rows: np.ndarray, rel: np.ndarray, perm: np.ndarray,
                  ks: tuple[int, ...], seed: int) -> dict:
    if base == "itq" and bits > min(len(train) * regions.shape[1], regions.shape[2]):
        return {}
    t0 = time.perf_counter()
    mc = MultiCodeHasher(make_hasher(base, bits, random_state=seed), match="min")
    mc.fit(regions[train], y_train)
    t_fit = time.perf_counter() - t0
    codes = mc.transform(regions)
    qc = codes[q_rows]
    t, dist = per_query_us(lambda: multicode_distances(qc, codes, "min"), len(q_rows), repeat=1)
    m = evaluate(-dist, q_rows, rel, perm, ks)
    return {"method": f"mc-{base}", "bits": bits, "bytes/img": codes.shape[1] * bits // 8, **m,
            "fit s": t_fit, "flat µs/q": t}


def markdown(df: pd.DataFrame) -> str:
    cols = [c for c in df.columns if c not in ("dataset", "encoder", "n", "queries", "train")]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                cells.append("" if np.isnan(v) else (f"{v:.0f}" if "µs" in c else f"{v:.3f}"))
            else:
                cells.append(str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="shared data dir (../shared/data)")
    ap.add_argument("--datasets", default="ucm16,ucm16-ml,rsscn7",
                    help=f"classic-encoder sets: {', '.join(CLASSIC_SETS)} ('' for none)")
    ap.add_argument("--stores-dir", type=Path, default=Path("/tmp/hash-stores"),
                    help="where the classic stores live (indexed here when absent)")
    ap.add_argument("--store", action="append", default=[], type=Path,
                    help="an existing store of any encoder (class labels from its items)")
    ap.add_argument("--multilabel-store", action="store_true",
                    help="--store relevance from the items' multi-labels")
    ap.add_argument("--bits", default="16,24,32,64,128")
    ap.add_argument("--methods", default="lsh,itq,klsh,ksh,mc-itq,mc-ksh")
    ap.add_argument("--k", default="10,100")
    ap.add_argument("--train-frac", type=float, default=0.5)
    ap.add_argument("--max-queries", type=int, default=0, help="0 = every test image")
    ap.add_argument("--no-regions", action="store_true", help="skip multi-code methods")
    ap.add_argument("--time-n", type=int, default=1_000_000,
                    help="synthetic archive size for the query-time table (0 = skip)")
    ap.add_argument("--time-queries", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write hashing_rsir.md and .csv here")
    a = ap.parse_args(argv)
    a.bits = [int(b) for b in a.bits.split(",") if b]
    a.k = [int(k) for k in a.k.split(",") if k]
    a.methods = [m for m in a.methods.split(",") if m]
    bad = [b for b in a.bits if b <= 0 or b % 8]
    if bad:
        print(f"error: code lengths must be positive multiples of 8, got {bad}", file=sys.stderr)
        return 2
    known = set(SINGLE_METHODS) | {f"mc-{m}" for m in SINGLE_METHODS}
    if set(a.methods) - known:
        print(f"error: unknown methods {sorted(set(a.methods) - known)}", file=sys.stderr)
        return 2
    if not 0 < a.train_frac < 1:
        print("error: --train-frac must be in (0, 1)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    data = a.data or shared_data_dir()

    todo: list[tuple[Dataset, Encoder | None]] = []
    names = [s for s in a.datasets.split(",") if s]
    classic = None
    for name in names:
        if name not in CLASSIC_SETS:
            print(f"error: unknown dataset {name!r}", file=sys.stderr)
            return 2
        folder, csv = CLASSIC_SETS[name]
        if not (data / folder).is_dir():
            print(f"skipping {name}: {data / folder} not found", file=sys.stderr)
            continue
        store_name = folder.split("/")[0] + "-classic"
        ucm_csv = data / CLASSIC_SETS["ucm16-ml"][1] if folder.startswith("ucm16") else None
        store = ensure_classic_store(data / folder, a.stores_dir / store_name, ucm_csv)
        if classic is None:
            from rscir.encoders import load_encoder

            classic = load_encoder("classic")
        todo.append((dataset_from_store(name, store, csv is not None), classic))
    for sd in a.store:
        store = DirectoryStore.open(sd)
        enc: Encoder | None = None
        if not a.no_regions:
            try:
                from rscir.encoders import load_encoder

                enc = load_encoder(store.manifest.model.name, device="cpu")
                if enc.info.fingerprint != store.manifest.model.fingerprint:
                    enc = None
            except Exception as e:  # any model-loading failure: run without multi-codes
                print(f"{sd}: no region encoder ({e}); multi-code methods skipped",
                      file=sys.stderr)
        todo.append((dataset_from_store(sd.name, store, a.multilabel_store), enc))
    if not todo:
        print("error: no dataset to run (missing data? see --data / --store)", file=sys.stderr)
        return 2

    print(SEED_REFERENCE)
    all_rows = []
    for ds, enc in todo:
        print(f"\n== {ds.name} ({ds.encoder_name}, n={len(ds.emb)}, d={ds.emb.shape[1]}, "
              f"{'multi' if ds.multilabel else 'single'}-label) ==", flush=True)
        need_regions = any(m.startswith("mc-") for m in a.methods) and not a.no_regions
        regions = region_vectors(ds, enc, a.stores_dir) if need_regions and enc else None
        all_rows += run_dataset(ds, a, regions)
    if a.time_n > 0:
        ds0 = todo[0][0]
        print(f"\n== query time on {a.time_n:,} items (tiled {ds0.name}) ==", flush=True)
        scale = scale_timing(ds0, a)
        for r in scale:
            r["dataset"] = f"{ds0.name} tiled to {a.time_n:,}"
        all_rows += scale
    df = pd.DataFrame(all_rows)
    parts = [f"# Hashing for RS retrieval (rscir benchmarks/hashing_rsir.py)\n\n{SEED_REFERENCE}\n"]
    for (name, enc_name), g in df.groupby(["dataset", "encoder"], sort=False):
        r0 = g.iloc[0]
        head = (f"## {name} — encoder {enc_name}, {r0['n']} images, {r0['queries']} queries, "
                f"{r0['train']} training images")
        table = markdown(g.dropna(axis=1, how="all"))
        print(f"\n{head}\n{table}")
        parts.append(f"{head}\n\n{table}\n")
    print(f"\n{SEED_REFERENCE}")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        df.to_csv(a.out / "hashing_rsir.csv", index=False)
        (a.out / "hashing_rsir.md").write_text("\n".join(parts))
        print(f"wrote {a.out / 'hashing_rsir.md'} and {a.out / 'hashing_rsir.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
