"""Items/s of `rscir index` single-process against `rscir index --ray`, same files, same model,
same run, and how far apart their embeddings are.

Both paths are end-to-end (decode, preprocess, embed, write the store). The Ray figure includes
the pipeline's start-up (probe task, encoder actors) but not ``ray.init``, which is timed apart:
on a long-lived cluster it is paid once. On one small machine Ray is not expected to win; it
exists to spread the work over many machines and GPUs (docs/ray.md).

    python benchmarks/ray_ingest.py                               # rscir-tiny, ucm16, 800 images
    python benchmarks/ray_ingest.py --arch ViT-B-32 --limit 128   # a real-size random model
    python benchmarks/ray_ingest.py --address auto --device cuda  # on a running GPU cluster
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from rscir.encoders import ModelRegistry, ModelSpec, default_registry
from rscir.ingest import index_folder, scan_folder
from rscir.ingest.ray_data import index_folder_ray
from rscir.stores import DirectoryStore

REPO = Path(__file__).resolve().parents[1]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=str(REPO.parent / "shared" / "data" / "ucm16" / "images"))
    ap.add_argument("--model", default="rscir-tiny")
    ap.add_argument("--arch", help="a randomly initialized open_clip arch instead (e.g. ViT-B-32)")
    ap.add_argument("--limit", type=int, default=800, help="number of images")
    ap.add_argument("--batch-size", type=int, default=64)
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
    tmp = Path(tempfile.mkdtemp(prefix="rscir-raybench-"))
    try:
        n = subset(Path(a.folder), a.limit, tmp / "archive")
        enc = factory().load(model, device=a.device, batch_size=a.batch_size)
        t0 = time.perf_counter()
        rep_local = index_folder(tmp / "archive", tmp / "local", enc, batch_size=a.batch_size,
                                 progress=False)
        t_local = time.perf_counter() - t0
        del enc

        t0 = time.perf_counter()
        init = {} if a.address != "local" else {
            "num_cpus": os.cpu_count(), "include_dashboard": False,
            "object_store_memory": a.object_store_mb * 1024**2}
        ray.init(address=a.address, **init)
        t_init = time.perf_counter() - t0
        res = ray.cluster_resources()
        try:
            t0 = time.perf_counter()
            rep_ray = index_folder_ray(tmp / "archive", tmp / "ray", model=model,
                                       device=a.device, batch_size=a.batch_size,
                                       num_encoders=a.num_encoders, registry_factory=factory,
                                       progress=False)
            t_ray = time.perf_counter() - t0
        finally:
            ray.shutdown()
        assert rep_local.embedded == rep_ray.embedded == n, (rep_local.summary(),
                                                             rep_ray.summary())
        loc, dis = DirectoryStore.open(tmp / "local"), DirectoryStore.open(tmp / "ray")
        rows = dis.rows_for_paths(loc.items["path"].tolist())
        diff = np.abs(np.asarray(loc.embeddings, np.float32)
                      - np.asarray(dis.embeddings, np.float32)[rows]).max()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gpus = int(res.get("GPU", 0))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-"
    print(f"model={model} images={n} batch={a.batch_size} cpus={os.cpu_count()} "
          f"ray_cpus={int(res.get('CPU', 0))} ray_gpus={gpus} gpu={gpu}")
    print(f"{'pipeline':<34}{'seconds':>10}{'items/s':>10}")
    print(f"{'single-process rscir index':<34}{t_local:>10.2f}{n / t_local:>10.1f}")
    print(f"{'rscir index --ray':<34}{t_ray:>10.2f}{n / t_ray:>10.1f}")
    print(f"{'(ray.init, paid once per cluster)':<34}{t_init:>10.2f}")
    print(f"ratio ray/single-process throughput: {t_local / t_ray:.2f}x")
    print(f"max |embedding difference| (as stored, {loc.manifest.dtype}): {diff:.2e}")


if __name__ == "__main__":
    main()
