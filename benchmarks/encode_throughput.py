"""Images/s of rscir's indexing pipeline against a plain open_clip loop, same files, same model,
same run.

The baseline is what most scripts do: open each file with PIL, preprocess, stack a batch and call
``model.encode_image`` in one process. rscir decodes in DataLoader workers while the model runs,
and also writes the store (atomic segments), so the ratio is end-to-end.

    python benchmarks/encode_throughput.py --folder ../shared/data/ucm16/images --limit 800
    python benchmarks/encode_throughput.py --random-arch ViT-B-32 --limit 256   # a real-size model
    python benchmarks/encode_throughput.py --device cuda --random-arch ViT-L-14   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rscir.encoders import ModelSpec, default_registry
from rscir.ingest import index_folder, scan_folder

REPO = Path(__file__).resolve().parents[1]


def plain_loop(enc, files: list[Path], batch_size: int) -> float:
    """Reference: sequential PIL decode + preprocess + encode_image (no workers, no store)."""
    model, pre = enc.model, enc.preprocess
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(files), batch_size):
            x = torch.stack([pre(Image.open(f).convert("RGB")) for f in files[i : i + batch_size]])
            with enc._autocast():
                f = model.encode_image(x.to(dev))
            torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=str(REPO.parent / "shared" / "data" / "ucm16" / "images"))
    ap.add_argument("--model", default="rscir-tiny")
    ap.add_argument("--random-arch", help="a randomly initialized open_clip arch (e.g. ViT-B-32)")
    ap.add_argument("--limit", type=int, default=800, help="number of images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()

    reg = default_registry()
    if a.random_arch:
        reg.register(ModelSpec(f"random-{a.random_arch}", a.random_arch, random_seed=0))
        enc = reg.load(f"random-{a.random_arch}", device=a.device, batch_size=a.batch_size)
    else:
        enc = reg.load(a.model, device=a.device, batch_size=a.batch_size)
    entries, _ = scan_folder(a.folder)
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(entries), size=min(a.limit, len(entries)), replace=False))
    tmp = Path(tempfile.mkdtemp(prefix="rscir-bench-"))
    try:
        sub = tmp / "archive"
        for i in pick:
            src = Path(a.folder) / entries[i].path
            dst = sub / entries[i].path
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src.resolve(), dst)
        files = sorted(p for p in sub.rglob("*") if p.is_file())
        n = len(files)
        # warm-up (model kernels, page cache) on a few files
        plain_loop(enc, files[: min(16, n)], a.batch_size)
        t_plain = plain_loop(enc, files, a.batch_size)
        t0 = time.perf_counter()
        rep = index_folder(sub, tmp / "store", enc, batch_size=a.batch_size, num_workers=a.workers,
                           progress=False)
        t_rscir = time.perf_counter() - t0
        assert rep.embedded == n, rep.summary()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dev = str(getattr(enc, "device", "cpu"))
    gpu = torch.cuda.get_device_name(0) if dev.startswith("cuda") else "-"
    print(f"model={enc.info.name} arch={enc.info.arch} device={dev} gpu={gpu} "
          f"cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} images={n} batch={a.batch_size}")
    print(f"{'pipeline':<28}{'seconds':>10}{'images/s':>12}")
    print(f"{'plain open_clip loop':<28}{t_plain:>10.2f}{n / t_plain:>12.1f}")
    print(f"{'rscir index (to store)':<28}{t_rscir:>10.2f}{n / t_rscir:>12.1f}")
    print(f"ratio rscir/plain throughput: {t_plain / t_rscir:.2f}x")


if __name__ == "__main__":
    main()
