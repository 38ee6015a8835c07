"""Load test of ``rscir serve`` on loopback: concurrent clients, zero errors, latency percentiles,
against the in-process :class:`rscir.search.Searcher` on the same queries in the same run.

A store of ``--items`` synthetic embeddings (the tiny model's dimension, written with
``DirectoryStore.add``) whose items are symlinks to a few generated images (so thumbnails work) is served
by a real ``rscir serve`` subprocess on 127.0.0.1, with its own thread settings. ``--clients``
concurrent HTTP/1.1 keep-alive connections send ``--requests`` composed searches (an item id as
the query image, a text modifier, a random λ, WeiCom, top ``--k``). The load generator is a
small asyncio client (a request is one write, a response is read by its Content-Length), so it
takes little of the CPUs it shares with the server. The baseline runs the same queries in this
process, one at a time on one thread (one BLAS thread), through ``Searcher.search``: the same
work a search needs — query vectors (texts cached, as the server caches them), fused scores,
top-k, hits with their metadata, similarities and WeiCom's normalized values — without HTTP:

* throughput with ``--clients`` clients against in-process ``Searcher.search`` calls/s (the
  issue's target: at least 0.7x), with their p50/p95 latency (target p95 <= 150 ms at 32
  clients on 50k items);
* server CPU time per search (from the OS, so other load on a shared machine does not count)
  against in-process CPU time per call;
* latency with one client (``--serial`` requests, no queueing) against in-process latency.

Every served hit (all its fields but the thumbnail URL) is checked to equal the in-process one.

    python benchmarks/serve_load.py                       # 50k items, 32 clients, 2,000 searches
    python benchmarks/serve_load.py --items 200000 --requests 5000 --workers 4

Exits non-zero if any request failed or any result differed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

TEXTS = ["a harbor with many boats", "with a swimming pool", "dense residential area",
         "a river crossing the forest", "snow on the mountains", "an airport runway",
         "with a baseball field", "farmland with circular fields", "a beach with white sand",
         "a parking lot full of cars", "storage tanks", "a highway interchange"]


def build_store(base: Path, n: int, n_images: int, seed: int) -> Path:
    """A one-segment store of ``n`` clustered unit vectors; item i is a symlink to image i % m."""
    from PIL import Image

    from rscir.encoders import load_encoder
    from rscir.stores import DirectoryStore

    info = load_encoder("rscir-tiny", device="cpu").info
    rng = np.random.default_rng(seed)
    root = base / "archive"
    (root / "img").mkdir(parents=True)
    (root / "tiles").mkdir()
    for j in range(n_images):
        arr = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "img" / f"real{j:02d}.png")
    classes = [f"class{c:02d}" for c in range(10)]
    centers = rng.standard_normal((len(classes), info.dim))
    cls = rng.integers(0, len(classes), n)
    emb = centers[cls] + 0.9 * rng.standard_normal((n, info.dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    paths = []
    for i in range(n):
        p = root / "tiles" / f"t{i:06d}.png"
        os.symlink(f"../img/real{i % n_images:02d}.png", p)
        paths.append(p.relative_to(root).as_posix())
    items = {"path": paths, "label": [classes[c] for c in cls],
             "labels": [[classes[c]] for c in cls],
             "lon": rng.uniform(-10, 10, n), "lat": rng.uniform(35, 55, n),
             "width": np.full(n, 64), "height": np.full(n, 64), "size": np.full(n, 1)}
    import pandas as pd

    st = DirectoryStore.create(base / "store", info, root)
    st.add(emb.astype(np.float32), pd.DataFrame(items))
    st.close()
    return base / "store"


def start_server(store: Path, workers: int, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # thread settings: the server's own
    with open(log, "w") as fh:  # the access log: one line per request; the URL is read back
        proc = subprocess.Popen(
            [sys.executable, "-m", "rscir.cli", "serve", str(store), "--port", "0", "--device",
             "cpu", "--workers", str(workers)], stdout=fh, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = re.search(r"rscir serve: (http://127\.0\.0\.1:\d+)/", log.read_text())
        if m and "Application startup complete" in log.read_text():
            return proc, m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited early:\n{log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server did not start:\n{log.read_text()}")


class Conn:
    """One HTTP/1.1 keep-alive connection (reopened when the server closed it)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: reopen
            fresh = self.writer is None
            if fresh:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None and self.writer is not None
            try:
                self.writer.write(head.encode() + body)
                raw = await self.reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if fresh or attempt:
                    raise
                continue
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            data = await self.reader.readexactly(int(headers.get("content-length", "0")))
            if headers.get("connection") == "close":
                await self.close()
            return status, data
        raise AssertionError("unreachable")


async def load(url: str, reqs: list[dict], clients: int) -> tuple[np.ndarray, list, int, float]:
    """Send every request from ``clients`` concurrent connections; latencies (s), served hits
    (each without its thumbnail URL), error count, wall time."""
    import orjson

    host, port = url.removeprefix("http://").rsplit(":", 1)
    bodies = [orjson.dumps(r) for r in reqs]
    lat = np.zeros(len(reqs))
    out: list = [None] * len(reqs)
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(reqs)):
        queue.put_nowait(i)

    async def worker() -> None:
        nonlocal errors
        conn = Conn(host, int(port))
        try:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                try:
                    status, data = await conn.post("/search", bodies[i])
                    if status != 200:
                        raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
                    hits = orjson.loads(data)["results"][0]["hits"]
                    out[i] = [{k: v for k, v in h.items() if k != "thumbnail"} for h in hits]
                except Exception as e:  # counted, reported, never fatal mid-run
                    errors += 1
                    await conn.close()
                    if errors <= 5:
                        print(f"  request {i} failed: {e!r}", file=sys.stderr)
                lat[i] = time.perf_counter() - t0
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return lat, out, errors, time.perf_counter() - t0


class InProcess:
    """The baseline: the same queries, in this process, one at a time on one thread (one BLAS
    thread), through Searcher.search (hits with metadata)."""

    def __init__(self, store_dir: Path, warm: dict) -> None:
        import torch

        from rscir.encoders import load_encoder
        from rscir.search import Searcher
        from rscir.stores import DirectoryStore

        torch.set_num_threads(1)
        self.searcher = Searcher(DirectoryStore.open(store_dir),
                                 load_encoder("rscir-tiny", device="cpu"))
        for t in TEXTS:  # the text cache warm, as the server's is; the scan copy made
            self.run([{**warm, "texts": [t]}])

    def one(self, q: dict) -> list:
        return self.searcher.search(item_id=q["item_id"], text=q["texts"], method=q["method"],
                                    lam=q["lam"], k=q["k"]).hits

    def run(self, reqs: list[dict]) -> tuple[np.ndarray, list, float]:
        """Latencies (s), hits (as JSON carries them) and CPU seconds of these queries."""
        import orjson
        from threadpoolctl import threadpool_limits

        lat = np.zeros(len(reqs))
        hits = []
        with threadpool_limits(1, user_api="blas"):
            c0 = time.process_time()
            for i, q in enumerate(reqs):
                t0 = time.perf_counter()
                hits.append(self.one(q))
                lat[i] = time.perf_counter() - t0
            cpu = time.process_time() - c0
        return lat, [orjson.loads(orjson.dumps([asdict(h) for h in hs])) for hs in hits], cpu


def server_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def ms(x: np.ndarray, p: float) -> float:
    return float(np.percentile(x, p) * 1e3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--serial", type=int, default=200, help="requests sent by a single client")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--workers", type=int, default=8, help="server search threads")
    ap.add_argument("--images", type=int, default=16, help="real image files behind the items")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=4,
                    help="load and baseline alternate over this many slices of the requests, "
                         "so a change in the machine's other load hits both alike")
    a = ap.parse_args()

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="rscir-load-") as tmp:
        base = Path(tmp)
        t0 = time.perf_counter()
        store = build_store(base, a.items, a.images, a.seed)
        print(f"store: {a.items} items (dim 32, float16) built in {time.perf_counter() - t0:.1f}s")
        rng = np.random.default_rng(a.seed + 1)
        reqs = [{"item_id": int(rng.integers(0, a.items)), "texts": [TEXTS[int(t)]],
                 "method": "weicom", "lam": round(float(lam), 2), "k": a.k}
                for t, lam in zip(rng.integers(0, len(TEXTS), a.requests),
                                  rng.uniform(0.05, 0.95, a.requests), strict=True)]
        inproc = InProcess(store, reqs[0])
        proc, url = start_server(store, a.workers, base / "server.log")
        lat, blat = np.zeros(a.requests), np.zeros(a.requests)
        served: list = [None] * a.requests
        ref: list = [None] * a.requests
        errors, wall, cpu, ccpu, bcpu = 0, 0.0, 0.0, 0.0, 0.0
        try:
            warm = [{**reqs[0], "texts": [t]} for t in TEXTS]  # model + text cache warm
            asyncio.run(load(url, warm, 4))
            slat, sserved, serrors, _ = asyncio.run(load(url, reqs[: a.serial], 1))
            for part in np.array_split(np.arange(a.requests), a.rounds):
                i0, i1 = int(part[0]), int(part[-1]) + 1
                cpu0, ccpu0 = server_cpu(proc.pid), time.process_time()
                lat[i0:i1], served[i0:i1], e, w = asyncio.run(load(url, reqs[i0:i1], a.clients))
                cpu += server_cpu(proc.pid) - cpu0
                ccpu += time.process_time() - ccpu0
                errors, wall = errors + e, wall + w
                blat[i0:i1], ref[i0:i1], c = inproc.run(reqs[i0:i1])
                bcpu += c
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        logged = sum(" POST /search " in line for line in (base / "server.log").open())
        bcpu /= a.requests

    errors += serrors
    mismatched = sum(s is not None and s != r for s, r in zip(served, ref, strict=True))
    mismatched += sum(s is not None and s != r for s, r in zip(sserved, ref, strict=False))
    tput, btput = a.requests / wall, len(blat) / blat.sum()
    print(f"checks : {a.requests + a.serial} searches, {errors} errors, {mismatched} results "
          f"differing from in-process (every hit field), {logged} requests in the access log")
    print(f"serial : 1 client, {a.serial} searches: latency p50 {ms(slat, 50):.1f} ms  "
          f"p95 {ms(slat, 95):.1f} ms")
    print(f"load   : {a.clients} clients, {a.requests} searches in {a.rounds} rounds, "
          f"{a.workers} server threads: "
          f"latency p50 {ms(lat, 50):.1f} ms  p95 {ms(lat, 95):.1f} ms  "
          f"max {lat.max() * 1e3:.1f} ms; throughput {tput:.0f} searches/s ({wall:.1f}s)")
    print(f"         CPU per search: server {cpu / a.requests * 1e3:.2f} ms, load generator "
          f"{ccpu / a.requests * 1e3:.2f} ms")
    print(f"in-proc: Searcher.search, one thread: latency p50 {ms(blat, 50):.2f} ms  "
          f"p95 {ms(blat, 95):.2f} ms; CPU {bcpu * 1e3:.2f} ms per call; {btput:.0f} calls/s")
    print(f"ratios : throughput {tput / btput:.2f}x in-process calls/s (target >= 0.7); "
          f"server CPU per search {cpu / a.requests / bcpu:.2f}x in-process; "
          f"serial p50 {ms(slat, 50) / ms(blat[: a.serial], 50):.2f}x in-process p50")
    print(f"machine: {os.cpu_count()} CPUs shared by clients, server and anything else; load "
          f"average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    return 1 if errors or mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
