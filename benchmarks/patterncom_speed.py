"""Seconds and pairs/s of rscir's PatternCom evaluation at PatternNet scale, before/after: the
current evaluation against the previous one (:mod:`rscir.bench.patterncom_baseline`) and a
reference-style per-query loop, all measured in the same run.

A synthetic PatternNet/PatternCom tree (38 classes × 800 images × 768 dims, ~21k CSV rows over
the six attributes, ~47k query–text pairs, as in the real benchmark) is generated in a temporary
folder; then

1. the full protocol with 4 methods (image, text, average, weicom) at λ = 0.5, with the previous
   evaluation (sorted rows, relevance lists padded to the longest) and the current one (ragged
   relevance lists, cache-sized blocks, reused buffers), checking that every per-pair AP, P@k
   and R@k is identical,
2. the λ sweep 0:1:0.1 for weicom, both ways, checked the same way,
3. the published evaluation's structure on a subset of pairs: for every (query, text) pair and
   method, score the archive, ``argsort`` it fully and test every ranked file's relevance in
   Python (``evaluate.py``'s ``calculate_rankings`` + ``metrics_calc``, on the CPU),

and the ratios are printed (pair × method evaluations per second). The machine may be shared:
CPU seconds (user + system, all threads and worker processes) are printed next to wall seconds.

    python benchmarks/patterncom_speed.py                 # full scale (~3 min on 2 cores)
    python benchmarks/patterncom_speed.py --scale 0.1     # quick smoke run
    python benchmarks/patterncom_speed.py --no-baseline   # the current evaluation only
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import tempfile
import time

import numpy as np
import torch

from rscir.bench import patterncom_baseline
from rscir.bench.fixtures import make_patterncom
from rscir.bench.patterncom import (
    CLASS_MERGES,
    Database,
    PatternComResult,
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


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished worker processes."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def timed(fn, *args, **kw) -> tuple[PatternComResult, float, float, str]:
    """The result, wall seconds, CPU seconds (all threads and worker processes) and the 1-min
    load average before → after (on a shared machine, other jobs' load changes the wall
    time of both evaluations; the CPU seconds vary much less)."""
    load0, cpu, wall = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
    res = fn(*args, **kw)
    return (res, time.perf_counter() - wall, cpu_seconds() - cpu,
            f"load {load0:.1f}→{os.getloadavg()[0]:.1f}")


def differences(a: PatternComResult, b: PatternComResult) -> int:
    """Pair × configuration entries whose AP, P@k or R@k differ between two runs."""
    bad = 0
    for x, y in zip(a.attributes, b.attributes, strict=True):
        for c in a.configs:
            mx, my = x.metrics[c], y.metrics[c]
            bad += int(np.sum((mx.ap != my.ap) | (mx.precision != my.precision).any(axis=1)
                              | (mx.recall != my.recall).any(axis=1)))
    return bad


def compare(name: str, units: int, new: tuple, old: tuple | None) -> None:
    res, wall, cpu, load = new
    line = (f"{name}: {wall:.1f}s wall, {cpu:.1f} CPU s ({units / wall:.0f} pair-configs/s, "
            f"{load})")
    if old is not None:
        ores, owall, ocpu, oload = old
        line += (f"; previous {owall:.1f}s wall, {ocpu:.1f} CPU s ({oload}) → "
                 f"{owall / wall:.1f}× wall, {ocpu / cpu:.1f}× CPU; "
                 f"entries differing: {differences(res, ores)}")
    print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 800 images/class")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--workers", type=int, default=None, help="threads (default: usable cores)")
    ap.add_argument("--naive-pairs", type=int, default=60, help="pairs for the reference loop")
    ap.add_argument("--no-sweep", action="store_true", help="skip the λ sweep")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the previous evaluation (no before/after)")
    a = ap.parse_args()
    workers = a.workers or default_workers()
    torch.set_num_threads(workers)

    with tempfile.TemporaryDirectory(prefix="patterncom_speed_") as tmp:
        t = time.perf_counter()
        fx = make_patterncom(tmp, per_class=max(2, round(800 * a.scale)), dim=a.dim)
        texts = fx.text_features
        db = Database(fx.features, fx.paths)
        rows = sum(len(read_attribute_csv(p)) for p in sorted(patterncom_dir(fx.root).glob("*.csv")))
        print(f"fixture: {len(fx.paths)} images × {a.dim} dims, {rows} CSV rows, generated in "
              f"{time.perf_counter() - t:.1f}s; {workers} worker(s)", flush=True)

        def run(methods, lams, previous: bool) -> tuple:
            kw = dict(methods=methods, lams=lams, workers=workers, progress=False)
            if previous:
                kw.update(evaluator=patterncom_baseline.evaluate_pairs, block=128)
            return timed(run_patterncom, fx.root, db, texts, **kw)

        old = None if a.no_baseline else run(METHODS4, [0.5], previous=True)
        new = run(METHODS4, [0.5], previous=False)
        res = new[0]
        n_pairs = sum(len(r.pairs) for r in res.attributes)
        print(f"{n_pairs} query–text pairs")
        compare("full protocol, 4 methods, λ=0.5", n_pairs * 4, new, old)
        print(res.table().to_string(), flush=True)
        fast_rate = n_pairs * len(res.configs) / new[1]

        if not a.no_sweep:
            lams = [round(0.1 * i, 1) for i in range(11)]
            old = None if a.no_baseline else run(["weicom"], lams, previous=True)
            new = run(["weicom"], lams, previous=False)
            compare("λ sweep 0:1:0.1 (weicom, 11 λ)", n_pairs * 11, new, old)

        cpu = cpu_seconds()
        secs, done = reference_style(fx.features, fx.paths, texts, str(fx.root), a.naive_pairs)
        cpu = cpu_seconds() - cpu
        naive_rate = done * len(METHODS4) / secs
        print(f"reference-style loop: {done} pairs × 4 methods in {secs:.1f}s "
              f"({naive_rate:.1f} pair-methods/s; {cpu:.1f} CPU s); the full protocol would "
              f"take {n_pairs * len(METHODS4) / naive_rate / 60:.0f} min")
        print(f"speed ratio (rscir / reference-style): {fast_rate / naive_rate:.0f}x")


if __name__ == "__main__":
    main()
