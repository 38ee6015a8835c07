"""`rscir bench ...`: benchmarks, one sub-subcommand each (``patterncom``, ``rsir``)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from .core import add_model_args


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``rscir bench`` and its benchmarks to the rscir parser."""
    p = sub.add_parser("bench", help="benchmarks: PatternCom composed retrieval, RS retrieval")
    bench_sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    register_patterncom(bench_sub)
    from ..bench import rsir

    rsir.register_cli(bench_sub)


def register_patterncom(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "patterncom",
        help="the PatternCom composed-retrieval protocol (Table 2 / Table 3 of the WeiCom paper)",
        description=(
            "Evaluate composed retrieval on PatternCom: every attribute CSV row is a query image, "
            "its texts are the other values of that attribute for its class. Features come from "
            "a model (the images are indexed into a store, reused on later runs) or from files."
        ),
    )
    p.add_argument("--data", required=True, metavar="DIR",
                   help="PatternNet root (images/, PatternCom/<attribute>.csv)")
    add_model_args(p)
    p.add_argument("--store", metavar="DIR",
                   help="with --model: the store to build or reuse (default: OUT/store)")
    p.add_argument("--features", metavar="FILE",
                   help="image features: an rscir store directory or a pickle with feats, paths")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a --features pickle with any Python objects in it (by default only "
                        "numpy arrays and plain containers are allowed: other objects can run "
                        "code when loaded)")
    p.add_argument("--text-features", metavar="FILE",
                   help="text features: .npz (texts + features) or JSON {text: vector}")
    p.add_argument("--methods", nargs="+", default=["image", "text", "average", "weicom"],
                   choices=["image", "text", "average", "weicom", "sum", "product"])
    p.add_argument("--lams", nargs="+", default=["0.5"], metavar="L",
                   help="WeiCom λ values or a sweep start:stop:step, e.g. 0.5 or 0:1:0.1")
    p.add_argument("--attributes", nargs="+", metavar="ATTR",
                   default=["color", "context", "density", "existence", "quantity", "shape"])
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--memory-cap", type=float, default=1024, metavar="MB",
                   help="similarity matrices held at once (default 1024 MB)")
    p.add_argument("--workers", type=int, default=None, help="threads (default: usable cores)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch when indexing")
    p.add_argument("--skip-missing", action="store_true",
                   help="skip CSV queries whose image is not in the features")
    p.add_argument("--all-metrics", action="store_true",
                   help="also write P@k / R@k tables (metrics.csv always has them)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the tables as JSON")
    p.set_defaults(func=cmd_patterncom)


def _store_text_encoder(st: Any, enc: Any) -> tuple[Any, Path]:
    """Text embeddings by the store's model, cached in the store (one file per weights)."""
    from ..bench.patterncom import cached_text_encoder

    name = "texts-" + hashlib.sha256(enc.info.fingerprint.encode()).hexdigest()[:16] + ".npz"
    cache = st.artifact_dir("patterncom") / name
    return cached_text_encoder(enc.encode_texts, cache), cache


def _inputs_from_model(a: argparse.Namespace, data: Path, out: Path) -> tuple[Any, Any, dict]:
    """Index (or reuse) the PatternNet images into a store and embed texts with the same model."""
    from ..api import index
    from ..bench.patterncom import load_database
    from ..encoders.builtin import default_registry
    from ..stores.directory import DirectoryStore

    images = data / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"{images} does not exist (expected PatternNet/images/<class>/)")
    store_dir = Path(a.store) if a.store else out / "store"
    enc = default_registry().load(a.model, arch=a.arch, checkpoint=a.checkpoint, device=a.device)
    rep = index(images, store_dir, encoder=enc, batch_size=a.batch_size,
                progress=not a.no_progress)
    if rep.bad:
        print(f"warning: {len(rep.bad)} image(s) could not be read, e.g. {rep.bad[0].path}: "
              f"{rep.bad[0].reason}", file=sys.stderr)
    with DirectoryStore.open(store_dir) as st:
        texts, cache = _store_text_encoder(st, enc)
    meta = {"model": enc.info.name, "arch": enc.info.arch, "store": str(store_dir),
            "text_cache": str(cache)}
    return load_database(store_dir), texts, meta


def _inputs_from_files(a: argparse.Namespace) -> tuple[Any, Any, dict]:
    from ..bench.patterncom import load_database, load_text_features

    db = load_database(a.features, trust_pickle=a.trust_pickle)
    meta: dict[str, Any] = {"features": str(a.features)}
    if a.text_features:
        meta["text_features"] = str(a.text_features)
        return db, load_text_features(a.text_features), meta
    if not Path(a.features).is_dir():
        raise ValueError("--text-features is required unless --features is an rscir store")
    # A store knows its model: embed the texts with it (cached in the store).
    from ..api import load_encoder_for_store
    from ..stores.directory import DirectoryStore

    with DirectoryStore.open(a.features) as st:
        enc = load_encoder_for_store(st, checkpoint=a.checkpoint, device=a.device)
        texts, cache = _store_text_encoder(st, enc)
    meta.update(model=enc.info.name, text_cache=str(cache))
    return db, texts, meta


def cmd_patterncom(a: argparse.Namespace) -> int:
    from ..bench.patterncom import parse_lams, patterncom_dir, run_patterncom
    from ..bench.report import lambda_table, method_table, write_patterncom_report

    from_model = a.model is not None or a.arch is not None
    if from_model == (a.features is not None):
        raise ValueError("give either --model (or --arch/--checkpoint) or --features")
    if from_model and a.text_features:
        raise ValueError("--text-features goes with --features, not with --model")
    if a.memory_cap <= 0:
        raise ValueError("--memory-cap must be > 0")
    if a.workers is not None and a.workers < 1:
        raise ValueError("--workers must be >= 1")
    lams = parse_lams(a.lams)
    data, out = Path(a.data), Path(a.out)
    patterncom_dir(data)  # fail early, before any indexing, on a wrong --data
    out.mkdir(parents=True, exist_ok=True)
    db, texts, meta = _inputs_from_model(a, data, out) if from_model else _inputs_from_files(a)
    res = run_patterncom(
        data, db, texts, methods=a.methods, lams=lams, attributes=a.attributes,
        memory_cap=int(a.memory_cap * 2**20), skip_missing=a.skip_missing, workers=a.workers,
        progress=not a.no_progress,
    )
    metrics = ["AP"] + ([f"{m}@{k}" for m in ("P", "R") for k in res.ks] if a.all_metrics else [])
    meta.update(data=str(data), methods=list(a.methods), lams=lams)
    written = write_patterncom_report(res, out, meta=meta, metrics=metrics)
    t2, t3 = method_table(res), lambda_table(res)
    if a.json:
        doc = {"table2": json.loads(t2.to_json(orient="index")),
               "table3": json.loads(t3.to_json(orient="index")) if t3 is not None else None,
               "files": {k: str(v) for k, v in written.items()}, "seconds": res.seconds}
        print(json.dumps(doc, indent=2))
    else:
        print(f"PatternCom mAP (%): {res.n_database} images, "
              f"{sum(len(r.pairs) for r in res.attributes)} pairs, {res.seconds:.1f} s")
        print(t2.to_string())
        if t3 is not None and len(t3) > 1:
            print("\nWeiCom λ:")
            print(t3.to_string())
        print(f"\nwritten to {out}/: " + ", ".join(sorted(p.name for p in written.values())))
    return 0
