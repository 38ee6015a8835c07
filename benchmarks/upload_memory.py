"""Peak memory of ``rscir serve`` under hostile uploads: peak RSS above idle, against the
documented bound (1.5 GB above idle with the default ``--decode-memory-mb 1024``).

A real ``rscir serve`` subprocess (rscir-tiny: open_clip preprocessing, which resizes the short
side to the model's input and so turns a thin strip into a huge float tensor) serves a small
store on loopback. Its peak RSS is read from ``/proc/PID/status`` (VmHWM, reset through
``/proc/PID/clear_refs`` before each case, so short spikes between samples are not missed).
Cases, each sent after the server is idle again:

* ``ordinary``: one 1024×768 JPEG (the scale of a normal query);
* ``thin``: a 51 kB PNG of 20×2,500,000 pixels (inside the 50 Mpx cap);
* ``strip``: a 20,000×1,000 PNG, the most elongated image the server accepts (aspect 20,
  longest side 20,000);
* ``png16``: 16 concurrent, distinct 50 Mpx RGB PNGs (~3.4 MB each);
* ``mix16``: 16 concurrent 50 Mpx uploads, 4 each of the formats costliest to decode: RGBA PNG,
  WebP, progressive JPEG, tiled 4-band uint16 TIFF.

The same cases then run (``--baseline``, on by default) against a server whose upload limits are
off (no aspect or side limit, an unbounded decode budget; uploads are still reduced before
encoding): the memory the bounds save, in the same run. ``--baseline-src DIR`` runs the baseline
server from another rscir source tree instead (e.g. the release before these limits, from
``git archive``). The baseline server's address space is capped ``--baseline-cap-gb`` above
idle, so a runaway decode fails there (MemoryError, HTTP 500) rather than exhausting the
machine. ``retained`` is RSS 3 s after a case minus idle (memory the allocator kept).

    python benchmarks/upload_memory.py
    python benchmarks/upload_memory.py --no-baseline --decode-memory-mb 512
    git archive 3645e0b src | tar -x -C /tmp/old && \
        python benchmarks/upload_memory.py --baseline-src /tmp/old/src

Exits non-zero if a bounded case exceeds the bound or a request got an unexpected status.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MiB = 1024 * 1024


def build_store(base: Path) -> Path:
    """A store of 64 random unit vectors over a few real images (rscir-tiny's dimension)."""
    import pandas as pd
    from PIL import Image

    from rscir.encoders import load_encoder
    from rscir.stores import DirectoryStore

    info = load_encoder("rscir-tiny", device="cpu").info
    rng = np.random.default_rng(0)
    root = base / "archive"
    root.mkdir(parents=True)
    n = 64
    paths = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
        paths.append(f"{i}.png")
    emb = rng.standard_normal((n, info.dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    items = pd.DataFrame({"path": paths, "label": ["x"] * n, "labels": [["x"]] * n,
                          "lon": np.zeros(n), "lat": np.zeros(n), "width": np.full(n, 32),
                          "height": np.full(n, 32), "size": np.full(n, 1)})
    st = DirectoryStore.create(base / "store", info, root)
    st.add(emb, items)
    st.close()
    return base / "store"


# ----------------------------------------------------------------------------- files
def _encode(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _pattern(h: int, w: int, c: int, dtype: type = np.uint8, step: int = 50) -> np.ndarray:
    """Mostly flat with a noisy row every ``step`` (compresses to a few MB, decodes in full)."""
    rng = np.random.default_rng(h + w + c)
    arr = np.zeros((h, w, c), dtype)
    hi = 255 if dtype == np.uint8 else 4000
    arr[::step] = rng.integers(0, hi, arr[::step].shape, dtype=dtype)
    return arr


def make_files() -> dict[str, bytes]:
    import tifffile

    side = 7071  # 7071² = 49,999,041 pixels, just under the 50 Mpx cap
    rgb = _pattern(side, side, 3)
    files = {
        "ordinary": _encode(_pattern(768, 1024, 3, step=1), "JPEG", quality=90),
        "thin": _encode(np.zeros((2_500_000, 20), np.uint8), "PNG"),
        "strip": _encode(_pattern(1000, 20_000, 3), "PNG", compress_level=1),
        "png": _encode(rgb, "PNG", compress_level=1),
        "rgba": _encode(_pattern(side, side, 4), "PNG", compress_level=1),
        "webp": _encode(rgb, "WEBP", quality=30, method=0),
        "jpeg_prog": _encode(rgb, "JPEG", quality=50, progressive=True),
    }
    del rgb
    buf = io.BytesIO()
    tifffile.imwrite(buf, _pattern(side, side, 4, np.uint16), compression="zlib", tile=(512, 512),
                     photometric="rgb", extrasamples=[0])
    files["tiff16"] = buf.getvalue()
    return files


def distinct(data: bytes, i: int) -> bytes:
    """The same image with a different SHA-256 (so the server's upload cache never answers):
    JPEG, PNG, WebP and TIFF decoders all ignore bytes after the image."""
    return data + f"--copy-{i:04d}".encode()


# ----------------------------------------------------------------------------- server
def start_server(store: Path, log: Path, extra: list[str],
                 src: Path | None = None) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rscir.cli", "serve", str(store), "--port", "0", "--device",
             "cpu", "--workers", "16", *extra],
            stdout=fh, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text()
        m = re.search(r"rscir serve: (http://127\.0\.0\.1:\d+)/", text)
        if m and "Application startup complete" in text:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited early:\n{text}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server did not start:\n{log.read_text()}")


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def rss(pid: int) -> int:
    return _status_kb(pid, "VmRSS") * 1024


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak(pid: int) -> int:
    return _status_kb(pid, "VmHWM") * 1024


def settle(pid: int, seconds: float = 3.0) -> int:
    time.sleep(seconds)
    return rss(pid)


@dataclass
class Case:
    name: str
    statuses: list[int]
    wall_s: float
    peak_above_idle: int
    retained: int


def send(url: str, uploads: list[tuple[str, bytes]]) -> tuple[list[int], float]:
    """POST every upload at once (one connection each); statuses and wall time."""
    import httpx

    def one(item: tuple[str, bytes]) -> int:
        name, data = item
        with httpx.Client(base_url=url, timeout=300) as c:
            r = c.post("/search", data={"query": '{"method": "image", "k": 3}'},
                       files={"image": (name, data, "application/octet-stream")})
            return r.status_code

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(uploads)) as ex:
        statuses = list(ex.map(one, uploads))
    return statuses, time.perf_counter() - t0


def run_cases(url: str, pid: int, files: dict[str, bytes]) -> tuple[int, list[Case]]:
    for i in range(3):  # warm-up: load everything lazy (torch kernels, PIL plugins, ...)
        send(url, [("w.jpg", distinct(files["ordinary"], 9000 + i))])
    idle = settle(pid)
    plan = {
        "ordinary": [("o.jpg", distinct(files["ordinary"], 1))],
        "thin": [("thin.png", files["thin"])],
        "strip": [("strip.png", files["strip"])],
        "png16": [("p.png", distinct(files["png"], i)) for i in range(16)],
        "mix16": [(f"m.{k}", distinct(files[k], i)) for i in range(4)
                  for k in ("rgba", "webp", "jpeg_prog", "tiff16")],
    }
    cases = []
    for name, uploads in plan.items():
        before = settle(pid, 1.0)
        reset_peak(pid)
        statuses, wall = send(url, uploads)
        top = peak(pid)
        after = settle(pid)
        cases.append(Case(name, statuses, wall, top - min(idle, before), after - idle))
        print(f"  {name:9s} statuses {sorted(set(statuses))} ×{len(statuses)}  wall {wall:6.1f}s  "
              f"peak above idle {(top - min(idle, before)) / MiB:7.0f} MB  "
              f"retained {(after - idle) / MiB:6.0f} MB", flush=True)
    return idle, cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode-memory-mb", type=int, default=1024,
                    help="the server's decode budget (default: the rscir serve default)")
    ap.add_argument("--bound-mb", type=float, default=1536,
                    help="allowed peak RSS above idle (default 1536 = 1.5 GB)")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the cases with the upload limits off (needs ~6 GB free)")
    ap.add_argument("--baseline-src", type=Path, metavar="DIR",
                    help="run the baseline server from this rscir source tree (its src/)")
    ap.add_argument("--baseline-cap-gb", type=float, default=6.0,
                    help="address-space headroom given to the baseline server over its idle "
                         "size, so a runaway decode fails (MemoryError) instead of exhausting "
                         "a shared machine (default 6)")
    a = ap.parse_args()

    expected = {"ordinary": {200}, "thin": {422}, "strip": {200}, "png16": {200},
                "mix16": {200}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="rscir-upmem-") as tmp:
        base = Path(tmp)
        store = build_store(base)
        t0 = time.perf_counter()
        files = make_files()
        print(f"files made in {time.perf_counter() - t0:.0f}s: " + ", ".join(
            f"{k} {len(v) / MiB:.2f} MB" for k, v in files.items()))
        configs: list[tuple[str, list[str], Path | None]] = [
            ("bounded", ["--decode-memory-mb", str(a.decode_memory_mb), "--max-connections",
                         "64"], None)]
        if a.baseline_src:
            configs.append(("baseline", [], a.baseline_src.resolve()))
        elif a.baseline:
            configs.append(("baseline", ["--decode-memory-mb", "1000000", "--max-aspect",
                                         "1000000000", "--max-side", "1000000000"], None))
        results: dict[str, list[Case]] = {}
        for label, extra, src in configs:
            proc, url = start_server(store, base / f"{label}.log", extra, src)
            try:
                if label == "baseline":
                    vsz = _status_kb(proc.pid, "VmSize") * 1024
                    cap = vsz + int(a.baseline_cap_gb * 1024 * MiB)
                    resource.prlimit(proc.pid, resource.RLIMIT_AS, (cap, cap))
                print(f"{label} server ({' '.join(extra)}{f' from {src}' if src else ''}): "
                      f"pid {proc.pid}")
                idle, cases = run_cases(url, proc.pid, files)
                print(f"  idle RSS {idle / MiB:.0f} MB")
                results[label] = cases
            finally:
                proc.terminate()
                proc.wait(30)
        print(f"\nbound: peak RSS above idle <= {a.bound_mb:.0f} MB "
              f"(decode budget {a.decode_memory_mb} MB)")
        have_base = "baseline" in results
        print(f"{'case':9s} {'bounded MB':>11s} {'/ bound':>8s} {'status':>8s}"
              + (f" {'baseline MB':>12s} {'status':>7s} {'base/bounded':>13s}"
                 if have_base else ""))
        for i, c in enumerate(results["bounded"]):
            ok_status = set(c.statuses) <= expected[c.name]
            ratio = c.peak_above_idle / (a.bound_mb * MiB)
            line = (f"{c.name:9s} {c.peak_above_idle / MiB:11.0f} {ratio:8.2f} "
                    f"{'ok' if ok_status else 'WRONG':>8s}")
            if have_base:
                b = results["baseline"][i]
                codes = ",".join(map(str, sorted(set(b.statuses))))
                ratio_b = (f"{b.peak_above_idle / c.peak_above_idle:13.1f}"
                           if c.peak_above_idle >= MiB else f"{'(bounded ~0)':>13s}")
                line += f" {b.peak_above_idle / MiB:12.0f} {codes:>7s} {ratio_b}"
            print(line)
            if not ok_status or (c.name != "ordinary" and ratio > 1.0):
                failed = True
    print("FAILED" if failed else "all bounded cases within the bound")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
