"""Seconds and pairs/s of rscir's PatternCom evaluation at PatternNet scale, against a
reference-style per-query loop measured in the same run.

A synthetic PatternNet/PatternCom tree (38 classes × 800 images × 768 dims, ~21k CSV rows over
the six attributes, as in the real benchmark) is generated in a temporary folder; then

1. the full protocol with 4 methods (image, text, average, weicom) at λ = 0.5,
2. the λ sweep 0:1:0.1 for weicom,
3. the published evaluation's structure on a subset of pairs: for every (query, text) pair and
   method, score the archive, ``argsort`` it fully and test every ranked file's relevance in
   Python (``evaluate.py``'s ``calculate_rankings`` + ``metrics_calc``, on the CPU),

and the ratio of (3)'s pairs/s to (1)'s is printed (both count pair × method evaluations).

    python benchmarks/patterncom_speed.py                 # full scale (~1 min for step 1 on 2 cores)
    python benchmarks/patterncom_speed.py --scale 0.1     # quick smoke run
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time

import numpy as np
import torch

from rscir.bench.fixtures import make_patterncom
from rscir.bench.patterncom import (
    CLASS_MERGES,
    Database,
    build_pairs,
    default_workers,
    patterncom_dir,
    read_attribute_csv,
    run_patterncom,
)

METHODS4 = ("image", "text", "average", "weicom")


def reference_style(
    feats: np.ndarray, paths: list[str], texts: dict[str, np.ndarray], root: str,
    n_pairs: int, seed: int = 0,
) -> tuple[float, int]:
    """Seconds for ``n_pairs`` random pairs × 4 methods, evaluated the way the published
    ``evaluate.py`` does (one query at a time, full argsort, Python relevance test per item)."""
    rng = np.random.default_rng(seed)
    db = torch.from_numpy(feats)
    names = [os.path.basename(p) for p in paths]
    csv_dir = patterncom_dir(root)
    jobs = []
    for a in ("color", "context", "density", "existence", "quantity", "shape"):
        table = read_attribute_csv(csv_dir / f"{a}.csv", a)
        pairs = build_pairs(table, paths)
        row_of = {f: i for i, f in enumerate(table.filenames)}
        labels = [re.split(r"\d", f)[0] for f in table.filenames]
        for p in rng.choice(len(pairs), size=min(len(pairs), n_pairs // 6 + 1), replace=False):
            jobs.append((pairs.query[p], pairs.texts[pairs.text[p]], labels[pairs.csv_row[p]],
                         row_of, table.values, labels))
    jobs = jobs[:n_pairs]

    def norm_cdf(m: torch.Tensor) -> torch.Tensor:
        mu, sd = m.mean(dim=0, keepdim=True), m.std(dim=0, keepdim=True)
        return 0.5 * (1 + torch.erf((m - mu) / (sd * torch.sqrt(torch.tensor(2.0)))))

    t0 = time.perf_counter()
    for q, text, qcls, row_of, values, labels in jobs:
        t = torch.from_numpy(texts[text])
        si, st = db[q] @ db.T, t @ db.T
        qm = CLASS_MERGES.get(qcls, qcls)
        for m in METHODS4:
            s = {"image": si, "text": st, "average": (si + st) / 2,
                 "weicom": 0.5 * norm_cdf(si) + 0.5 * norm_cdf(st)}[m]
            ranks = torch.argsort(s, descending=True)
            idx = [row_of.get(names[r], -1) for r in ranks.tolist()]
            rel = [values[i] == text and CLASS_MERGES.get(labels[i], labels[i]) == qm
                   if i != -1 else False for i in idx]
            hits, prec = 0, []
            for k, r in enumerate(rel, start=1):
                if r:
                    hits += 1
                    prec.append(hits / k)
            _ = round(sum(prec) / len(prec) * 100, 2) if prec else 0.0
            _ = [sum(rel[:k]) for k in (5, 10, 15, 20)]
    return time.perf_counter() - t0, len(jobs)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 800 images/class")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--workers", type=int, default=None, help="threads (default: usable cores)")
    ap.add_argument("--naive-pairs", type=int, default=60, help="pairs for the reference loop")
    ap.add_argument("--no-sweep", action="store_true", help="skip the λ sweep")
    a = ap.parse_args()
    workers = a.workers or default_workers()
    torch.set_num_threads(workers)

    with tempfile.TemporaryDirectory(prefix="patterncom_speed_") as tmp:
        t = time.perf_counter()
        fx = make_patterncom(tmp, per_class=max(2, round(800 * a.scale)), dim=a.dim)
        texts = fx.text_features
        db = Database(fx.features, fx.paths)
        rows = sum(len(read_attribute_csv(p)) for p in sorted(patterncom_dir(fx.root).glob("*.csv")))
        print(f"fixture: {len(fx.paths)} images × {a.dim} dims, {rows} CSV rows, generated in {time.perf_counter() - t:.1f}s; {workers} worker(s)")

        cpu = time.process_time()
        res = run_patterncom(fx.root, db, texts, methods=METHODS4, lams=[0.5], workers=workers,
                             progress=False)
        cpu = time.process_time() - cpu
        n_pairs = sum(len(r.pairs) for r in res.attributes)
        fast_rate = n_pairs * len(res.configs) / res.seconds
        print(f"full protocol, 4 methods, λ=0.5: {n_pairs} pairs in {res.seconds:.1f}s "
              f"({n_pairs / res.seconds:.0f} pairs/s, {fast_rate:.0f} pair-methods/s; "
              f"{cpu:.1f} CPU s over all threads)")
        print(res.table().to_string())

        if not a.no_sweep:
            cpu = time.process_time()
            sw = run_patterncom(fx.root, db, texts, methods=["weicom"],
                                lams=[round(0.1 * i, 1) for i in range(11)], workers=workers,
                                progress=False)
            cpu = time.process_time() - cpu
            print(f"λ sweep 0:1:0.1 (weicom, 11 λ): {sw.seconds:.1f}s "
                  f"({n_pairs * 11 / sw.seconds:.0f} pair-λ/s; {cpu:.1f} CPU s)")

        cpu = time.process_time()
        secs, done = reference_style(fx.features, fx.paths, texts, str(fx.root), a.naive_pairs)
        cpu = time.process_time() - cpu
        naive_rate = done * len(METHODS4) / secs
        print(f"reference-style loop: {done} pairs × 4 methods in {secs:.1f}s "
              f"({naive_rate:.1f} pair-methods/s; {cpu:.1f} CPU s); the full protocol would "
              f"take {n_pairs * len(METHODS4) / naive_rate / 60:.0f} min")
        print(f"speed ratio (rscir / reference-style): {fast_rate / naive_rate:.0f}x")


if __name__ == "__main__":
    main()
