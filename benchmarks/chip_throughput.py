"""Chips of one large scene vs the same pixels as pre-cut tiles: chips/s and peak RSS.

    python benchmarks/chip_throughput.py [--size 20480] [--chip 256] [--dir /tmp/rscir-chipbench]

Generates (once, in ``--dir``) a ``size``×``size`` 3-band uint8 tiled GeoTIFF (UTM, deflate;
written window by window) and the same pixels cut into ``chip``×``chip`` GeoTIFF tiles, then
measures in fresh subprocesses, in this run:

* ``decode``: the ingestion decoder alone (``iter_decoded`` with a trivial preprocess): chips
  read by windowed reads from the scene vs the pre-cut tile files (``--workers`` processes);
* ``index``: a full ``index_folder`` with ``rscir-tiny`` (``--chip-size`` on the scene vs the
  tile folder), with its store commits.

Peak memory is sampled every 0.2 s as the proportional set size (PSS: shared pages counted
once) of the process tree, main process plus decoding workers (``ru_maxrss`` would not do: on
Linux it survives ``execve``, so a child reports its parent's peak); also the main process's
after imports and model loading (the fixed cost), and the main process's peak RSS (VmHWM,
which starts afresh at ``execve``). Rates exclude that set-up. The ratios scene/tiles are printed last; the issue's target is a peak RSS well under
2 GB for a 20,000² scene whatever its size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, os, sys, threading, time
from pathlib import Path
import numpy as np
import psutil
mode, what, root, chip, workers, store = sys.argv[1:7]
chip, workers = int(chip), int(workers)
me = psutil.Process()
peak = {"tree": 0, "self": 0}
def pss(p):
    try:
        return p.memory_full_info().pss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0
def sample(stop):
    while not stop.is_set():
        own = pss(me)
        tree = own + sum(pss(c) for c in me.children(recursive=True))
        peak["tree"] = max(peak["tree"], tree)
        peak["self"] = max(peak["self"], own)
        stop.wait(0.2)
import torch
torch.set_num_threads(1)
from rscir.encoders import load_encoder
from rscir.ingest import index_folder
from rscir.ingest.archive import scan_folder
from rscir.ingest.local import iter_decoded
from rscir.ingest.scenes import ChipSpec, plan_chips
from rscir.ingest.units import Source
enc = load_encoder("rscir-tiny", device="cpu") if mode == "index" else None
setup = pss(me)
stop = threading.Event()
th = threading.Thread(target=sample, args=(stop,), daemon=True)
th.start()
t0 = time.perf_counter()
if mode == "decode":
    entries, _ = scan_folder(root)
    sources = [Source(e.path, e.size, e.mtime_ns) for e in entries]
    plan = plan_chips(Path(root), sources, ChipSpec(chip) if what == "scene" else None, None).plan
    n = 0
    for batch in iter_decoded(Path(root), plan, np.asarray, batch_size=64, num_workers=workers):
        n += sum(1 for b in batch if b[3] is None and not b[4])
else:
    rep = index_folder(root, store, enc, num_workers=workers, progress=False,
                       chip_size=chip if what == "scene" else None, batch_size=64,
                       segment_size=4096, labels="none")
    n = rep.embedded
    assert not rep.bad, rep.bad[:3]
dt = time.perf_counter() - t0
stop.set()
th.join()
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(json.dumps({"items": n, "seconds": dt, "pss_setup_mb": setup / 2**20, "hwm_mb": hwm / 1024,
                  "pss_self_mb": peak["self"] / 2**20, "pss_tree_mb": peak["tree"] / 2**20}))
"""


def make_scene(path: Path, size: int) -> None:
    """A tiled, deflated GeoTIFF with texture, written block row by block row."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.tif")
    rng = np.random.default_rng(0)
    band = 512
    with rasterio.open(tmp, "w", driver="GTiff", width=size, height=size, count=3,
                       dtype="uint8", crs="EPSG:32633", transform=from_origin(500000, 5e6, 1, 1),
                       tiled=True, blockxsize=256, blockysize=256, compress="deflate") as ds:
        x = np.arange(size)
        for r0 in range(0, size, band):
            h = min(band, size - r0)
            y = np.arange(r0, r0 + h)[:, None]
            base = ((np.sin(x / 97.0) + np.cos(y / 61.0)) * 60 + 120)
            data = np.stack([base + 20 * k for k in range(3)])
            data = data + rng.integers(0, 24, data.shape)
            ds.write(np.clip(data, 0, 255).astype(np.uint8), window=Window(0, r0, size, h))
    os.replace(tmp, path)


def make_tiles(scene: Path, out: Path, chip: int) -> None:
    """The scene's full chip windows as separate GeoTIFF files (same compression)."""
    import rasterio
    from rasterio.windows import Window
    from rasterio.windows import transform as wtransform

    tmp = out.with_name(out.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    with rasterio.open(scene) as ds:
        prof = ds.profile.copy()
        prof.update(width=chip, height=chip, blockxsize=min(256, chip),
                    blockysize=min(256, chip))
        for r in range(0, ds.height - chip + 1, chip):
            d = tmp / f"r{r:06d}"
            d.mkdir(exist_ok=True)
            for c in range(0, ds.width - chip + 1, chip):
                w = Window(c, r, chip, chip)
                with rasterio.open(d / f"c{c:06d}.tif", "w",
                                   **{**prof, "transform": wtransform(w, ds.transform)}) as t:
                    t.write(ds.read(window=w))
    os.replace(tmp, out)


def run(mode: str, what: str, root: Path, chip: int, workers: int, store: Path) -> dict:
    import shutil

    shutil.rmtree(store, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", CHILD, mode, what, str(root), str(chip),
                          str(workers), str(store)], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"{mode}/{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=20480, help="scene width = height (pixels)")
    ap.add_argument("--chip", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1, help="decoding processes")
    ap.add_argument("--dir", default="/tmp/rscir-chipbench")
    ap.add_argument("--modes", default="decode,index")
    a = ap.parse_args()
    base = Path(a.dir)
    scene_dir = base / f"scene-{a.size}"
    scene = scene_dir / "scene.tif"
    tiles = base / f"tiles-{a.size}-{a.chip}"
    t0 = time.perf_counter()
    if not scene.is_file():
        make_scene(scene, a.size)
    if not tiles.is_dir():
        make_tiles(scene, tiles, a.chip)
    n_tiles = (a.size // a.chip) ** 2
    print(f"scene {a.size}x{a.size}x3 uint8 ({scene.stat().st_size / 2**20:.0f} MiB on disk), "
          f"{n_tiles} tiles of {a.chip}²; data ready in {time.perf_counter() - t0:.0f}s",
          flush=True)
    rows = []
    for mode in a.modes.split(","):
        for what, root in (("scene", scene_dir), ("tiles", tiles)):
            r = run(mode, what, root, a.chip, a.workers, base / f"store-{mode}-{what}")
            r.update(mode=mode, what=what, per_s=r["items"] / r["seconds"], rss_mb=r["pss_tree_mb"])
            rows.append(r)
            print(f"{mode:>6} {what:>6}: {r['items']:>6} items in {r['seconds']:7.1f}s = "
                  f"{r['per_s']:7.1f} chips/s; peak memory (PSS) main {r['pss_self_mb']:5.0f} "
                  f"MiB (after imports/model {r['pss_setup_mb']:4.0f}), main + workers "
                  f"{r['pss_tree_mb']:5.0f} MiB; peak RSS main {r['hwm_mb']:5.0f} MiB", flush=True)
    for mode in a.modes.split(","):
        s = next(r for r in rows if r["mode"] == mode and r["what"] == "scene")
        t = next(r for r in rows if r["mode"] == mode and r["what"] == "tiles")
        print(f"{mode:>6} scene/tiles: throughput x{s['per_s'] / t['per_s']:.2f}, "
              f"peak memory x{s['rss_mb'] / t['rss_mb']:.2f} "
              f"(scene {s['rss_mb']:.0f} MiB, {'under' if s['rss_mb'] < 2048 else 'OVER'} 2 GiB)")


if __name__ == "__main__":
    main()
