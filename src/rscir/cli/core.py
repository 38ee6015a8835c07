"""`rscir index`, `rscir search`, `rscir info`: the core capability on an embedded store."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError, PathNotFoundError

PRESET_NAMES = ("sentinel2-l2a", "sentinel2-l1c", "landsat-c2l2", "naip")  # ingest.sensors


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="registry model name (see `rscir models`)")
    g.add_argument("--arch", help="any open_clip architecture, with --checkpoint")
    g.add_argument("--checkpoint", help="local weights file (open_clip state dict)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def parse_lams(spec: str) -> list[float]:
    """'0.5', '0,0.25,1' or a sweep 'start:stop:step' (inclusive)."""
    spec = spec.strip()
    if ":" in spec:
        a, b, s = (float(x) for x in spec.split(":"))
        if s <= 0:
            raise InvalidArgumentError("λ sweep step must be > 0")
        n = int(round((b - a) / s)) + 1
        return [round(a + i * s, 10) for i in range(n)]
    return [float(x) for x in spec.split(",") if x.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="index (or resume indexing) an archive into a store")
    p.add_argument("folder", metavar="PATH",
                   help="archive: a folder of images/scenes (searched recursively), a "
                        "BigEarthNet-S2 folder (v1 or v2), or a STAC catalog/ItemCollection file")
    p.add_argument("--store", required=True,
                   help="store directory or postgresql://... URI (created if absent)")
    add_model_args(p)
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                   help="open_clip image tower: auto = fp32 on CPU (exact), bf16 on CUDA; "
                        "bf16/int8 on CPU are faster and slightly lossy (top-10 agreement "
                        "printed by benchmarks/encode_throughput.py)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores)")
    p.add_argument("--labels", choices=["folder", "none"], default="folder",
                   help="class label from the parent folder name, or none")
    p.add_argument("--labels-csv", help="CSV of labels per file (path + label, or 0/1 columns)")
    p.add_argument("--segment-size", type=int, default=2048, help="items per atomic commit")
    p.add_argument("--max-pixels", type=int, default=100_000_000)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run as a Ray Data pipeline (docs/ray.md): alone = RAY_ADDRESS or a "
                        "cluster started on this machine, else a local one; or local, auto, "
                        "HOST:PORT, ray://HOST:10001")
    g = p.add_argument_group("scenes and chips (docs/geospatial.md)")
    g.add_argument("--chip-size", type=int, metavar="N",
                   help="cut every raster larger than N×N px into N×N chips, one item each "
                        "(windowed reads: memory stays bounded whatever the scene size)")
    g.add_argument("--stride", type=int, metavar="S", help="chip stride in pixels (default N)")
    g.add_argument("--edge", choices=["pad", "drop"], default="pad",
                   help="chips running past a scene's edge: pad with nodata (default) or drop")
    g.add_argument("--min-valid", type=float, default=0.5, metavar="F",
                   help="skip (and count) chips with less than this share of valid pixels")
    g = p.add_argument_group("bands and sensors")
    g.add_argument("--bands", help="bands of the RGB composite by number or name: 4,3,2 or "
                   "B04,B03,B02 (STAC: asset keys or eo:bands names)")
    g.add_argument("--sensor", choices=sorted(PRESET_NAMES),
                   help="sensor preset: band names, 8-bit stretch and nodata")
    g.add_argument("--stretch", metavar="LO,HI", help="8-bit stretch: raw values LO,HI (e.g. "
                   "0,3000) or percentiles pLO,pHI per image (default p2,p98; uint8 as is)")
    g.add_argument("--nodata", type=float, help="value of missing pixels (default: the file's)")
    g = p.add_argument_group("archive kinds, time")
    g.add_argument("--archive", choices=["auto", "folder", "bigearthnet", "stac"],
                   default="auto", help="what PATH is (auto: detected)")
    g.add_argument("--asset", help="STAC: the asset to index (default visual)")
    g.add_argument("--bigearthnet-labels", type=int, choices=[19, 43], default=19,
                   help="BigEarthNet: the 19-class (default) or v1's 43-class labels")
    g.add_argument("--datetime-from", metavar="PATTERN",
                   help="acquisition time from file names, a strftime pattern such as "
                        "%%Y%%m%%dT%%H%%M%%S (else TIFF tags, STAC, BigEarthNet metadata)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="composed search: query image + text modifier")
    p.add_argument("store", help="store directory or postgresql://... URI")
    p.add_argument("--image", help="query image file")
    p.add_argument("--item-id", type=int, help="an archive item id as the query image")
    p.add_argument("--text", action="append", default=[], help="text modifier (repeat to average)")
    p.add_argument("--method", default=None,
                   help="weicom (default with image and text), weicom-x, minmax, harris, basic, "
                   "average, sum, product, image, text, or FUSION+centre+tcentre+project+qe "
                   "(docs/fusion_methods.md); an image alone is image-only, a text alone "
                   "text-only")
    p.add_argument("--qe-k", type=int, default=None,
                   help="neighbours of query expansion (methods with +qe; default 25)")
    p.add_argument("--objects", help="file of object words, one a line (tcentre/project)")
    p.add_argument("--styles", help="file of style/background words, one a line (project)")
    p.add_argument("--lam", type=float, default=0.5, help="λ: 0 = image only, 1 = text only")
    p.add_argument("--lams", help="several λ, e.g. 0,0.25,0.5,0.75,1 or 0:1:0.25")
    p.add_argument("-k", type=int, default=20, help="results per λ (up to 10000)")
    p.add_argument("--offset", type=int, default=0, help="skip this many results (paging)")
    p.add_argument("--include-query", action="store_true", help="keep the query item in results")
    p.add_argument("--strategy", default="auto", choices=["auto", "brute", "exact-stream", "ann"],
                   help="top-k by full scan, threshold algorithm on exact streams, or on the ANN "
                   "index of `rscir build-ann` (auto: ann when built and the archive is large)")
    g = p.add_argument_group("filters (hits keep their unfiltered scores)")
    g.add_argument("--label", action="append", default=[],
                   help="only items with this class/label (repeat: any of them)")
    g.add_argument("--all-labels", action="store_true", help="items must have every --label")
    g.add_argument("--bbox", help="W,S,E,N in WGS84 degrees: the footprint intersects it")
    g.add_argument("--within", help="GeoJSON file (or inline geometry): the footprint intersects it")
    g.add_argument("--start", help="acquired on or after (ISO date/datetime, UTC)")
    g.add_argument("--end", help="acquired on or before (ISO date/datetime, UTC; a date = whole day)")
    g.add_argument("--ids", help="only these item ids (comma-separated)")
    g.add_argument("--exclude-ids", help="never these item ids (comma-separated)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="machine-readable results (= --format json)")
    o.add_argument("--format", choices=["text", "json", "geojson", "csv", "parquet"],
                   default=None, help="text (default), json, geojson (RFC 7946), csv, or "
                   "parquet (GeoParquet)")
    o.add_argument("--out", help="write to this file instead of standard output")
    o.add_argument("--sheet", help="write a contact sheet PNG here")
    add_model_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("info", help="describe a store")
    p.add_argument("store", help="store directory or postgresql://... URI")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="list the registry's models")
    p.set_defaults(func=cmd_models)


def cmd_index(a: argparse.Namespace) -> int:
    options = {
        "labels": "csv" if a.labels_csv and a.labels == "none" else a.labels,
        "labels_csv": a.labels_csv, "dtype": a.dtype, "batch_size": a.batch_size,
        "segment_size": a.segment_size, "max_pixels": a.max_pixels,
        "progress": not a.no_progress, "chip_size": a.chip_size, "stride": a.stride,
        "edge": a.edge, "min_valid": a.min_valid, "bands": a.bands, "sensor": a.sensor,
        "stretch": a.stretch, "nodata": a.nodata, "datetime_from": a.datetime_from,
        "archive": a.archive, "asset": a.asset, "bigearthnet_labels": a.bigearthnet_labels,
    }
    if a.ray is not None:
        from ..ingest.ray_data import index_folder_ray

        rep = index_folder_ray(a.folder, a.store, model=a.model, arch=a.arch,
                               checkpoint=a.checkpoint, device=a.device,
                               precision=a.precision, address=a.ray or None, **options)
    else:
        from ..api import index

        rep = index(a.folder, a.store, model=a.model, arch=a.arch, checkpoint=a.checkpoint,
                    device=a.device, precision=a.precision, num_workers=a.workers,
                    **options)
    if a.json:
        print(json.dumps(rep.to_dict(), indent=1))
    else:
        print(rep.summary())
    return 0


# Python argument names in the library's messages → this command's flags
_FLAGS = (("item_id=", "--item-id"), ("image=", "--image"), ("text=", "--text"),
          ("lam=", "--lam"), ("offset=", "--offset"), ("k=", "-k"), ("method=", "--method"))


def _flags(msg: str) -> str:
    for py, flag in _FLAGS:
        msg = msg.replace(py, flag)
    return msg


def _id_list(value: str | None, flag: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise InvalidArgumentError(f"{flag} takes comma-separated item ids, got {value!r}") from None


def search_filter(a: argparse.Namespace) -> Any:
    """The ItemFilter the search flags describe (None without any)."""
    from ..stores.filters import ItemFilter

    f = ItemFilter(labels=tuple(a.label), all_labels=a.all_labels, bbox=a.bbox,
                   within=a.within, start=a.start, end=a.end, ids=_id_list(a.ids, "--ids"),
                   exclude_ids=_id_list(a.exclude_ids, "--exclude-ids") or ())
    return None if f.is_empty() else f


def _words(path: str | None, flag: str) -> tuple[str, ...] | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise PathNotFoundError(f"{flag}: no word file at {p}")
    words = tuple(w.strip() for w in p.read_text().splitlines() if w.strip())
    if not words:
        raise InvalidArgumentError(f"{flag}: {p} holds no words (one a line)")
    return words


def fusion_options(a: argparse.Namespace) -> Any:
    """The FusionOptions the search flags describe (defaults otherwise)."""
    from ..scoring.methods import FusionOptions

    kw: dict[str, Any] = {}
    if a.qe_k is not None:
        kw["qe_k"] = a.qe_k
    for name, flag in (("objects", "--objects"), ("styles", "--styles")):
        words = _words(getattr(a, name), flag)
        if words is not None:
            kw[name] = words
    return FusionOptions(**kw)


def cmd_search(a: argparse.Namespace) -> int:
    from ..api import open_searcher
    from ..errors import QueryError
    from ..search.export import render
    from ..search.results import score_decimals

    if not 1 <= a.k <= 10_000:
        raise InvalidArgumentError("-k must be in 1..10000")
    if a.image and not Path(a.image).is_file():
        raise PathNotFoundError(f"query image not found: {a.image}")
    fmt = a.format or ("json" if a.json else "text")
    if fmt == "parquet" and not a.out:
        raise InvalidArgumentError("--format parquet needs --out FILE")
    lams = parse_lams(a.lams) if a.lams else [a.lam]
    where = search_filter(a)
    s = open_searcher(a.store, strategy=a.strategy, fusion=fusion_options(a), model=a.model,
                      arch=a.arch, checkpoint=a.checkpoint, device=a.device)
    with s:
        try:
            results = s.search(image=a.image, item_id=a.item_id, text=a.text or None, lam=lams,
                               k=a.k, offset=a.offset, method=a.method,
                               exclude_query=not a.include_query, where=where)
        except QueryError as e:
            raise QueryError(_flags(str(e))) from None
        if fmt == "text":
            lines = []
            for r in results:
                dec = score_decimals([h.score for h in r.hits])
                lines.append(f"# method={r.method} λ={r.lam:g} text={' + '.join(r.texts) or '-'}"
                             + (f" offset={r.offset}" if r.offset else ""))
                for h in r.hits:
                    why = "".join(f" {n}={v:+.3f}" for n, v in (("img", h.sim_image),
                                                                ("txt", h.sim_text)) if v is not None)
                    lines.append(f"{h.rank:>4}  id={h.id:<8} {h.score:.{dec}f}{why}  {h.path}")
            data = ("\n".join(lines) + "\n").encode()
        else:
            query = {"image": a.image, "item_id": results[0].query_id, "texts": a.text,
                     "method": results[0].method, "k": a.k, "offset": a.offset,
                     "filter": None if where is None else where.to_dict()}
            data = render(results, fmt, query)
        if a.out:
            from ..search.export import write_bytes

            write_bytes(data, a.out)
            print(f"wrote {sum(len(r.hits) for r in results)} hits ({fmt}) to {a.out}",
                  file=sys.stderr)
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        if a.sheet:
            from PIL import Image

            from ..ingest.images import load_image
            from ..ingest.render import item_image
            from ..sheet import contact_sheet

            store = s.store
            query_img: Image.Image | None = None
            if a.image:
                query_img, _ = load_image(a.image)
            elif a.item_id is not None:  # a chip renders as the chip, not its scene
                query_img = item_image(store, str(store.items_for_ids([a.item_id])["path"].iloc[0]))
            path = contact_sheet(store, results, query_img, a.sheet)
            print(f"contact sheet written to {path}", file=sys.stderr)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from ..stores.uri import open_store

    with open_store(a.store) as store:
        info = store.info()
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    m = info.pop("model")
    for k, v in info.items():
        print(f"{k:>14}: {v}")
    print(f"{'model':>14}: {m['name']} ({m['arch']}, dim {m['dim']}, {m['backend']})")
    print(f"{'weights':>14}: {m['fingerprint']}  source={m['source']}")
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from ..encoders.builtin import default_registry

    reg = default_registry()
    for name in reg.names():
        spec = reg.specs[name]
        src = spec.hub_repo and f"hf-hub:{spec.hub_repo}/{spec.hub_file}" or (
            spec.open_clip_tag and f"open_clip:{spec.open_clip_tag}") or spec.backend
        star = " (default)" if name == reg.default_model else ""
        print(f"{name:<22} {spec.arch:<12} {src}{star}  {spec.description}")
    print("\nany open_clip architecture: --arch ARCH --checkpoint FILE (a local state dict)")
    return 0
