"""Items/s of `rscir index` single-process against `rscir index --ray`, same files, same model,
same run, and how far apart their embeddings are.

Both paths are end-to-end (decode, preprocess, embed, write the store). ``ray.init`` is timed
apart (paid once per cluster). Each Ray run also starts its encoder actors (worker processes,
imports, model builds: the session's start-up); the single-process path's model is built before
its clock starts, so the fair comparison is Ray *after its start-up*, printed as the
"amortized" ratio, next to the end-to-end one. The two paths alternate (``--rounds`` runs each)
and medians are compared, since the machine may be shared; the load average is printed.

    python benchmarks/ray_ingest.py                               # rscir-mini, ucm16, 800 images
    python benchmarks/ray_ingest.py --model rscir-tiny --limit 1600
    python benchmarks/ray_ingest.py --arch ViT-B-32 --limit 256   # a real-size random model
    python benchmarks/ray_ingest.py --address auto --device cuda  # on a running GPU cluster
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rscir.encoders import ModelInfo, ModelRegistry, ModelSpec, default_registry
from rscir.ingest import (
    Driver,
    EmbeddedBatch,
    IngestOptions,
    LocalDriver,
    RasterRead,
    WorkPlan,
    run_index,
    scan_folder,
)
from rscir.ingest.ray_data import EncoderSpec, RayDriver
from rscir.stores import DirectoryStore

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RSCIR_SHARED_DATA", REPO.parent / "shared" / "data"))


def registry_with_random(arch: str | None) -> ModelRegistry:
    """The default registry plus ``random-ARCH`` (seeded random weights), built on every worker."""
    reg = default_registry()
    if arch:
        reg.register(ModelSpec(f"random-{arch}", arch, random_seed=0))
    return reg


def subset(folder: Path, limit: int, dst: Path) -> int:
    """Symlink a seeded random subset of the archive (same relative paths) into ``dst``."""
    entries, _ = scan_folder(folder)
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(entries), size=min(limit, len(entries)), replace=False))
    for i in pick:
        p = dst / entries[i].path
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((folder / entries[i].path).resolve(), p)
    return len(pick)


class Timed(Driver):
    """A driver that notes when its session is ready (the encoders started)."""

    def __init__(self, inner: Driver) -> None:
        self.inner = inner
        self.ready = 0.0

    @contextlib.contextmanager
    def session(self) -> Iterator[ModelInfo]:
        with self.inner.session() as info:
            self.ready = time.perf_counter()
            yield info

    def embed(self, root: Path, plan: WorkPlan, read: RasterRead, opts: IngestOptions,
              ) -> Iterator[EmbeddedBatch]:
        return self.inner.embed(root, plan, read, opts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=str(DATA / "ucm16" / "images"))
    ap.add_argument("--model", default=None, help="registry name (default: the default model)")
    ap.add_argument("--arch", help="a randomly initialized open_clip arch instead (e.g. ViT-B-32)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--limit", type=int, default=800, help="number of images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each path")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--address", default="local",
                    help="Ray cluster (default: a new local instance on all cores)")
    ap.add_argument("--num-encoders", type=int, default=None)
    ap.add_argument("--object-store-mb", type=int, default=512)
    a = ap.parse_args()

    import ray
    import torch

    factory = functools.partial(registry_with_random, a.arch)
    model = f"random-{a.arch}" if a.arch else a.model
    opts = IngestOptions(batch_size=a.batch_size, progress=False)
    spec = EncoderSpec(model, None, None, a.precision, a.batch_size, factory)
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="rscir-raybench-"))
    t_local: list[float] = []
    t_ray: list[float] = []
    t_start: list[float] = []
    try:
        n = subset(Path(a.folder), a.limit, tmp / "archive")
        enc = factory().load(model, device=a.device, batch_size=a.batch_size,
                             precision=a.precision)
        t0 = time.perf_counter()
        init = {} if a.address != "local" else {
            "num_cpus": os.cpu_count(), "include_dashboard": False,
            "object_store_memory": a.object_store_mb * 1024**2}
        ray.init(address=a.address, **init)
        t_init = time.perf_counter() - t0
        res = ray.cluster_resources()
        try:
            for r in range(a.rounds):
                t0 = time.perf_counter()
                rep_local = run_index(tmp / "archive", tmp / f"local{r}", LocalDriver(enc), opts)
                t_local.append(time.perf_counter() - t0)
                drv = Timed(RayDriver(spec, device=a.device, num_encoders=a.num_encoders))
                t0 = time.perf_counter()
                rep_ray = run_index(tmp / "archive", tmp / f"ray{r}", drv, opts)
                t_ray.append(time.perf_counter() - t0)
                t_start.append(drv.ready - t0)
                assert rep_local.embedded == rep_ray.embedded == n, (rep_local.summary(),
                                                                     rep_ray.summary())
        finally:
            ray.shutdown()
        loc, dis = DirectoryStore.open(tmp / "local0"), DirectoryStore.open(tmp / "ray0")
        rows = dis.rows_for_paths(loc.items["path"].tolist())
        diff = np.abs(np.asarray(loc.embeddings, np.float32)
                      - np.asarray(dis.embeddings, np.float32)[rows]).max()
        dtype = loc.manifest.dtype
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gpus = int(res.get("GPU", 0))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-"
    med = statistics.median
    after = [t - s for t, s in zip(t_ray, t_start, strict=True)]
    print(f"model={enc.info.name} images={n} batch={a.batch_size} cpus={os.cpu_count()} "
          f"ray_cpus={int(res.get('CPU', 0))} ray_gpus={gpus} gpu={gpu} rounds={a.rounds}")
    print(f"load average before {load0[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print(f"{'pipeline':<38}{'seconds':>9}{'items/s':>9}   (median; all runs s)")
    for label, ts in (("single-process rscir index", t_local),
                      ("rscir index --ray, end to end", t_ray),
                      ("  of which encoder start-up", t_start),
                      ("  after start-up (amortized)", after)):
        rate = "-" if ts is t_start else f"{n / med(ts):.1f}"
        print(f"{label:<38}{med(ts):>9.2f}{rate:>9}   {' '.join(f'{x:.1f}' for x in ts)}")
    print(f"{'(ray.init, paid once per cluster)':<38}{t_init:>9.2f}")
    print(f"ratio ray/single-process throughput: end to end {med(t_local) / med(t_ray):.2f}x, "
          f"amortized {med(t_local) / med(after):.2f}x")
    print(f"max |embedding difference| (as stored, {dtype}): {diff:.2e}")


if __name__ == "__main__":
    main()
