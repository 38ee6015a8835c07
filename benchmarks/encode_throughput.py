"""Images/s of rscir's indexing pipeline against a plain open_clip loop, same files, same model,
same run, and how far the embeddings rscir stores are from the loop's.

The baseline is what most scripts do: open each file with PIL, preprocess, stack a batch and
call the stock model (open_clip's ``encode_image`` in fp32; for rscir-mini its tower) in one
process. rscir decodes in DataLoader workers while the model runs, embeds with the encoder's
inference tower (``--precision``: fp32 = fused attention, same embeddings; bf16 / int8 lossy,
opt-in) and also writes the store (atomic segments, float16), so the ratio is end-to-end.

The machine may be shared: the two pipelines run alternately (``--rounds`` times each, ABAB)
and the medians are compared; process CPU time (the workers' included) is printed beside the
wall-clock figures, and the load average before and after.

    python benchmarks/encode_throughput.py                                  # rscir-mini, 800 UCM
    python benchmarks/encode_throughput.py --random-arch ViT-B-32 --limit 256 --precision int8
    python benchmarks/encode_throughput.py --device cuda --random-arch ViT-L-14   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rscir.encoders import ModelSpec, default_registry
from rscir.encoders.inference import topk_agreement
from rscir.ingest import index_folder, scan_folder
from rscir.stores import DirectoryStore

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RSCIR_SHARED_DATA", REPO.parent / "shared" / "data"))


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def stock_forward(enc: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as its own library runs it: open_clip's ``encode_image``, rscir-mini's tower."""
    model = getattr(enc, "model", None)
    if model is not None and hasattr(model, "encode_image"):
        return model.encode_image
    if getattr(enc, "numpy_tower", False):  # rscir-mini's default: descriptor + numpy MLP
        return enc.encode_preprocessed  # type: ignore[no-any-return]
    if hasattr(enc, "tower"):
        return enc.tower
    raise SystemExit(f"no plain forward for {type(enc).__name__}")


def plain_loop(enc: Any, files: list[Path], batch_size: int) -> np.ndarray:
    """Reference: sequential PIL decode + preprocess + stock forward (no workers, no store)."""
    forward, pre = stock_forward(enc), enc.preprocess
    dev = torch.device(str(getattr(enc, "device", "cpu")))
    out = []
    with torch.no_grad():
        for i in range(0, len(files), batch_size):
            items = [pre(Image.open(f).convert("RGB")) for f in files[i : i + batch_size]]
            if not isinstance(items[0], torch.Tensor):  # numpy inputs: the numpy tower
                out.append(np.asarray(forward(np.stack(items)), np.float32))
                continue
            x = torch.stack(items)
            autocast = getattr(enc, "_autocast", None)
            if autocast is not None and dev.type == "cuda":
                with autocast():
                    f = forward(x.to(dev))
            else:
                f = forward(x.to(dev))
            out.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=str(DATA / "ucm16" / "images"))
    ap.add_argument("--model", default=None, help="registry name (default: the default model)")
    ap.add_argument("--random-arch", help="a randomly initialized open_clip arch (e.g. ViT-B-32)")
    ap.add_argument("--precision", default="auto",
                    help="rscir's precision: auto (fp32 on CPU), fp32, bf16, int8 (lossy ones "
                         "are opt-in; the top-10 agreement with the fp32 loop is printed)")
    ap.add_argument("--limit", type=int, default=800, help="number of images")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="rscir's decoding processes")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each pipeline")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()

    reg = default_registry()
    name = a.model
    if a.random_arch:
        name = f"random-{a.random_arch}"
        reg.register(ModelSpec(name, a.random_arch, random_seed=0))
    enc = reg.load(name, device=a.device, batch_size=a.batch_size, precision=a.precision)
    entries, _ = scan_folder(a.folder)
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(entries), size=min(a.limit, len(entries)), replace=False))
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="rscir-bench-"))
    t_plain: list[float] = []
    t_rscir: list[float] = []
    c_plain: list[float] = []
    c_rscir: list[float] = []
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
        enc.encode_images([Image.open(f).convert("RGB") for f in files[: min(16, n)]])
        for r in range(a.rounds):
            c0, t0 = cpu_seconds(), time.perf_counter()
            ref = plain_loop(enc, files, a.batch_size)
            t_plain.append(time.perf_counter() - t0)
            c_plain.append(cpu_seconds() - c0)
            store = tmp / f"store{r}"
            c0, t0 = cpu_seconds(), time.perf_counter()
            rep = index_folder(sub, store, enc, batch_size=a.batch_size,
                               num_workers=a.workers, progress=False)
            t_rscir.append(time.perf_counter() - t0)
            c_rscir.append(cpu_seconds() - c0)
            assert rep.embedded == n, rep.summary()
        st = DirectoryStore.open(store)
        rows = st.rows_for_paths([str(f.relative_to(sub)) for f in files])
        got = np.asarray(st.embeddings, np.float32)[rows]
        dtype = st.manifest.dtype
        st.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dev = str(getattr(enc, "device", "cpu"))
    gpu = torch.cuda.get_device_name(0) if dev.startswith("cuda") else "-"
    prec = getattr(enc, "precision", "fp32")
    print(f"model={enc.info.name} arch={enc.info.arch} device={dev} gpu={gpu} precision={prec} "
          f"cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} images={n} "
          f"batch={a.batch_size} rounds={a.rounds}")
    print(f"load average before {load0[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print(f"{'pipeline':<30}{'seconds':>9}{'images/s':>10}{'CPU ms/img':>12}   (median; all runs s)")
    for label, ts, cs in (("plain loop (fp32, own forward)", t_plain, c_plain),
                          (f"rscir index ({prec}, to store)", t_rscir, c_rscir)):
        t, c = statistics.median(ts), statistics.median(cs)
        print(f"{label:<30}{t:>9.2f}{n / t:>10.1f}{1e3 * c / n:>12.1f}   "
              f"{' '.join(f'{x:.1f}' for x in ts)}")
    ratio = statistics.median(t_plain) / statistics.median(t_rscir)
    per_round = " ".join(f"{p / q:.2f}" for p, q in zip(t_plain, t_rscir, strict=True))
    print(f"ratio rscir/plain throughput: {ratio:.2f}x (per round: {per_round})")
    print(f"max |stored - plain loop| ({dtype} store): {np.abs(got - ref).max():.2e}; "
          f"top-10 agreement with the fp32 loop's rankings over these {n} images: "
          f"{topk_agreement(ref, got, 10):.4f}")


if __name__ == "__main__":
    main()
