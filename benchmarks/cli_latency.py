"""Wall time of a cold ``rscir search`` (a new process each time), next to ``import torch``.

Every command runs in a fresh Python process, ``--repeat`` times (median, min and max shown),
so the numbers are what a user typing the command sees. The reference measured in the same
run is ``python -c "import torch"``: on a shared or slow machine everything scales with it, so
compare the ratios. Cases:

* ``rscir --help``;
* text search, cold: an archive item as the query image plus a text never seen (an empty
  ``RSCIR_CACHE``, so the text tower runs);
* text search, cached: the same text again (the persistent text-embedding cache answers);
* image-only search with an archive image (its stored embedding is used);
* image-only search with an image from outside the archive (the image tower runs);

then the breakdown of one cold text search and one outside-image search inside a single
process: imports, opening the store and model, encoding the query, searching, output; and
``rscir serve``: seconds until it prints its address, then the first and the second text query
(a new text each, over HTTP).

    python benchmarks/cli_latency.py                       # indexes ../shared/data/ucm16 once
    python benchmarks/cli_latency.py --store runs/ucm.rscir --repeat 5
    python benchmarks/cli_latency.py --src /tmp/base/src   # another checkout (before/after)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

INFO = r"""
import json, sys
from rscir.stores.uri import open_store
with open_store(sys.argv[1]) as s:
    rel = str(s.items_for_ids([int(sys.argv[2])])["path"].iloc[0])
    print(json.dumps([str(s.resolve_path(rel)), len(s)]))
"""

BREAKDOWN = r"""
import json, os, sys, time
t0 = time.perf_counter()
import rscir.cli, rscir.api
from PIL import Image
t1 = time.perf_counter()
store, text, item, image = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
s = rscir.api.open_searcher(store)
t2 = time.perf_counter()
if image:
    vec, _ = s.image_vector(image)
else:
    vec = s.text_vector([text]); s.item_vector(item)
t3 = time.perf_counter()
if image:
    r = s.search(image=image, method="image", k=20)
else:
    r = s.search(item_id=item, text=text, lam=0.5, k=20)
t4 = time.perf_counter()
with open(os.devnull, "w") as out:
    print(f"# method={r.method} lam={r.lam:g}", file=out)
    for h in r.hits:
        print(f"{h.rank:>4}  id={h.id:<8} {h.score:9.5f}  {h.path}", file=out)
t5 = time.perf_counter()
s.close()
print(json.dumps({"imports": t1 - t0, "open store + model": t2 - t1, "encode query": t3 - t2,
                  "search": t4 - t3, "output": t5 - t4, "total in process": t5 - t0,
                  "torch imported": "torch" in sys.modules}))
"""


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return wall, p.stdout


def timed(label: str, cmd: list[str], env: dict[str, str], repeat: int,
          before: object = None) -> dict[str, float | str]:
    walls = []
    for _ in range(repeat):
        if callable(before):
            before()
        walls.append(run(cmd, env)[0])
    return {"case": label, "median": statistics.median(walls), "min": min(walls),
            "max": max(walls)}


def serve_latency(cli: list[str], store: str, env: dict[str, str]) -> dict[str, float]:
    """Start ``rscir serve``, wait for its address line, time two text queries."""
    import re
    import urllib.request

    t0 = time.perf_counter()
    p = subprocess.Popen([*cli, "serve", store, "--port", "0"], env=env, text=True,
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        assert p.stderr is not None
        url = None
        for line in p.stderr:
            m = re.search(r"(http://\S+?)/ ", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            raise SystemExit("rscir serve did not print its address")
        out = {"start (address printed)": time.perf_counter() - t0}
        for name, text in (("first text query", "a harbor with many boats"),
                           ("second text query", "a dense residential area")):
            body = json.dumps({"item_id": 3, "texts": [text], "k": 20}).encode()
            req = urllib.request.Request(url + "/search", data=body,
                                         headers={"Content-Type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=300) as r:
                r.read()
            out[name] = time.perf_counter() - t
        return out
    finally:
        p.terminate()
        p.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="store to search (default: index --folder into runs/)")
    ap.add_argument("--folder", default=str(REPO.parent / "shared" / "data" / "ucm16" / "images"))
    ap.add_argument("--src", default=str(REPO / "src"), help="rscir source tree to measure")
    ap.add_argument("--text", default="with boats")
    ap.add_argument("--item-id", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-serve", action="store_true", help="skip the rscir serve timing")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()

    py = sys.executable
    env = {**os.environ, "PYTHONPATH": a.src, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("RSCIR_CACHE", None)
    work = Path(tempfile.mkdtemp(prefix="rscir-cli-latency-"))
    store = a.store
    if store is None:
        store = str(REPO / "runs" / "cli_latency.rscir")
        if not Path(store, "manifest.json").is_file():
            print(f"indexing {a.folder} into {store} (once) ...", file=sys.stderr)
            run([py, "-m", "rscir.cli", "index", a.folder, "--store", store, "--no-progress"], env)
    cli = [py, "-m", "rscir.cli"]
    archive_image, n_items = json.loads(run([py, "-c", INFO, store, str(a.item_id)], env)[1])
    outside = work / ("outside" + Path(archive_image).suffix)
    shutil.copyfile(archive_image, outside)  # same pixels, but not an archive file

    cold_env = {**env, "RSCIR_CACHE": str(work / "cache-cold")}
    warm_env = {**env, "RSCIR_CACHE": str(work / "cache-warm")}

    def empty_cache() -> None:
        shutil.rmtree(work / "cache-cold", ignore_errors=True)

    search = [*cli, "search", store, "-k", "20"]
    run([*search, "--item-id", str(a.item_id), "--text", a.text], warm_env)  # fill warm cache
    rows = [
        timed('python -c "import torch"', [py, "-c", "import torch"], env, a.repeat),
        timed("rscir --help", [*cli, "--help"], env, a.repeat),
        timed("search: item + text (cold text)",
              [*search, "--item-id", str(a.item_id), "--text", a.text], cold_env, a.repeat,
              before=empty_cache),
        timed("search: item + text (cached text)",
              [*search, "--item-id", str(a.item_id), "--text", a.text], warm_env, a.repeat),
        timed("search: archive image only",
              [*search, "--image", archive_image, "--method", "image"], env, a.repeat),
        timed("search: outside image only",
              [*search, "--image", str(outside), "--method", "image"], env, a.repeat),
    ]
    empty_cache()
    parts = {
        "item + text (cold text)": json.loads(run(
            [py, "-c", BREAKDOWN, store, a.text, str(a.item_id), ""], cold_env)[1]),
        "outside image only": json.loads(run(
            [py, "-c", BREAKDOWN, store, a.text, str(a.item_id), str(outside)], env)[1]),
    }
    empty_cache()
    served = serve_latency(cli, store, cold_env) if not a.no_serve else {}
    shutil.rmtree(work, ignore_errors=True)

    torch_s = float(rows[0]["median"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# rscir CLI latency: {a.src}; store {store} ({n_items} items); "
          f"{os.cpu_count()} CPUs, load average {load:.1f}; {a.repeat} runs each, wall seconds")
    print(f"{'case':<36} {'median':>7} {'min':>7} {'max':>7} {'x import torch':>15}")
    for r in rows:
        print(f"{r['case']:<36} {r['median']:7.2f} {r['min']:7.2f} {r['max']:7.2f} "
              f"{float(r['median']) / torch_s:15.2f}")
    for name, d in parts.items():
        print(f"\n# breakdown, one process: {name} (torch imported: {d.pop('torch imported')})")
        for k, v in d.items():
            print(f"  {k:<22} {v:6.2f} s")
    if served:
        print("\n# rscir serve (text never seen before, empty cache)")
        for k, v in served.items():
            print(f"  {k:<24} {v:6.2f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "breakdown": parts, "serve": served},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
