"""`rscir bench ...`: benchmarks, one sub-subcommand each (``patterncom``, ``rsir``,
``composed``, ``xview2-cir``)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError, PathNotFoundError
from .core import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``rscir bench`` and its benchmarks to the rscir parser."""
    p = sub.add_parser("bench", help="benchmarks: PatternCom / real-tile / xView2-CIR composed "
                                      "retrieval, RS retrieval")
    bench_sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    register_patterncom(bench_sub)
    register_rsir(bench_sub)
    register_composed(bench_sub)
    register_xview2(bench_sub)


RSIR_KS = (5, 10, 20, 50, 100)  # rscir.bench.rsir.KS (not imported: `rscir --help` stays light)


def _int_list(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.replace(",", " ").split()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected integers like 5,10,20, got {text!r}") from e
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"k values must be >= 1, got {text!r}")
    return ks


def register_rsir(sub: argparse._SubParsersAction) -> None:
    """``rscir bench rsir``: the retrieval tables of :mod:`rscir.bench.rsir`."""
    p = sub.add_parser(
        "rsir",
        help="image-to-image, multi-label and text-to-image retrieval on UCM-16 / RSSCN7 / "
             "multi-label (e.g. BigEarthNet) stores",
        description="Retrieval tables of one or more stores: single-label (class) retrieval, "
        "multi-label retrieval (the store's own multi-labels, or ucm16/multilabels.csv), and "
        "text-to-image retrieval on the UCM captions test split; see rscir.bench.rsir.")
    p.add_argument("--store", action="append", required=True, metavar="STORE",
                   help="a store built by `rscir index` (repeatable: one table row per store)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="folder with ucm16/{images,multilabels.csv,captions.jsonl} "
                        "(default: $RSCIR_SHARED_DATA or ../shared/data)")
    p.add_argument("--out", default="runs/bench-rsir", metavar="DIR",
                   help="where rsir.md, rsir.csv, rsir_*.csv and rsir.json go (default %(default)s)")
    p.add_argument("--model", help="model for caption embeddings (default: the store's model)")
    p.add_argument("--checkpoint", help="weights file for --model / the store's model")
    p.add_argument("--device", default="auto")
    p.add_argument("--ks", type=_int_list, default=list(RSIR_KS), metavar="K,K,...",
                   help="cut-offs of P@k, ACG@k, NDCG@k (default %(default)s)")
    p.add_argument("--no-text", action="store_true", help="skip text-to-image retrieval")
    p.set_defaults(func=cmd_rsir)


def cmd_rsir(a: argparse.Namespace) -> int:
    from ..bench.rsir import RsirData, default_data_dir, evaluate_store, markdown, write_outputs

    data = RsirData(Path(a.data) if a.data else default_data_dir())
    reports = [evaluate_store(s, data, ks=a.ks, model=a.model, checkpoint=a.checkpoint,
                              device=a.device, text=not a.no_text) for s in a.store]
    paths = write_outputs(reports, a.out, a.ks)
    print(markdown(reports, a.ks))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def register_patterncom(sub: argparse._SubParsersAction) -> None:
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
        raise PathNotFoundError(f"{images} does not exist (expected PatternNet/images/<class>/)")
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
        raise InvalidArgumentError("--text-features is required unless --features is an rscir store")
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
        raise InvalidArgumentError("give either --model (or --arch/--checkpoint) or --features")
    if from_model and a.text_features:
        raise InvalidArgumentError("--text-features goes with --features, not with --model")
    if a.memory_cap <= 0:
        raise InvalidArgumentError("--memory-cap must be > 0")
    if a.workers is not None and a.workers < 1:
        raise InvalidArgumentError("--workers must be >= 1")
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


# --------------------------------------------------------------------------- composed / xView2
def _add_output_args(p: argparse.ArgumentParser) -> None:
    """Where a composed benchmark writes its report, and how it talks while running."""
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON")


def _add_fusion_args(p: argparse.ArgumentParser) -> None:
    """Methods, λ and the options of the new fusions (``rscir.scoring.FusionOptions``)."""
    g = p.add_argument_group("methods")
    g.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="method names: presets (weicom, minmax, harris, basic, weicom-x, ...) or "
                        "FUSION+centre+tcentre+project+qe (default: the whole ablation)")
    g.add_argument("--lams", nargs="+", default=["0:1:0.05"], metavar="L",
                   help="λ values or a sweep start:stop:step (default %(default)s)")
    g.add_argument("--objects", metavar="FILE", help="object word list, one per line")
    g.add_argument("--styles", metavar="FILE", help="style word list, one per line")
    g.add_argument("--alpha", type=float, default=0.2, help="style weight of the projection")
    g.add_argument("--n-components", type=int, default=None,
                   help="projection directions (default: a third of the dimension)")
    g.add_argument("--qe-k", type=int, default=25, help="query-expansion neighbours")
    g.add_argument("--qe-beta", type=float, default=0.1, help="query-expansion weight sharpness")
    g.add_argument("--harris-h", type=float, default=0.1, help="Harris trace weight, [0, 0.25)")
    g.add_argument("--seed", type=int, default=0, help="seed of the val/test split")


def _fusion_options(a: argparse.Namespace) -> Any:
    from ..bench.composed import read_word_list
    from ..scoring import FusionOptions

    kw: dict[str, Any] = {"alpha": a.alpha, "n_components": a.n_components, "qe_k": a.qe_k,
                          "qe_beta": a.qe_beta, "harris_h": a.harris_h}
    if a.objects:
        kw["objects"] = read_word_list(a.objects)
    if a.styles:
        kw["styles"] = read_word_list(a.styles)
    return FusionOptions(**kw)


def _check_methods(methods: list[str] | None) -> list[str] | None:
    from ..scoring import method_spec

    return None if not methods else [method_spec(m).name for m in methods]


def _store_and_encoder(a: argparse.Namespace, images: Path, out: Path) -> tuple[Path, Any]:
    """The store to read (``--store``, indexed from ``images`` first when ``--model`` is given
    or the store does not exist yet) and its text encoder."""
    from ..api import index, load_encoder_for_store
    from ..encoders.builtin import default_registry
    from ..stores.directory import DirectoryStore

    store_dir = Path(a.store) if a.store else out / "store"
    from_model = a.model is not None or a.arch is not None
    if from_model or not (store_dir / "manifest.json").exists():
        if not images.is_dir():
            raise PathNotFoundError(f"{images} does not exist: nothing to index")
        enc = default_registry().load(a.model, arch=a.arch, checkpoint=a.checkpoint,
                                      device=a.device)
        rep = index(images, store_dir, encoder=enc, progress=not a.no_progress)
        if rep.bad:
            print(f"warning: {len(rep.bad)} image(s) could not be read, e.g. "
                  f"{rep.bad[0].path}: {rep.bad[0].reason}", file=sys.stderr)
        return store_dir, enc
    with DirectoryStore.open(store_dir) as st:
        enc = load_encoder_for_store(st, checkpoint=a.checkpoint, device=a.device)
    return store_dir, enc


def _print_summary(res: Any, written: dict, out: Path, as_json: bool, header: str,
                   average: bool = False) -> None:
    tasks = res.queries.tasks()
    if average and len(tasks) > 1:  # PatternCom attributes: the average over them first
        tasks = ["avg", *tasks]
    if as_json:
        doc = {"summary": {t: json.loads(res.summary(t).to_json(orient="index")) for t in tasks},
               "files": {k: str(v) for k, v in written.items()}, "seconds": res.seconds,
               "skipped": res.skipped}
        print(json.dumps(doc, indent=2))
        return
    print(header)
    cols = ["lambda", "val mAP", "mAP"] + [f"R@{k}" for k in res.ks] + ["Δ vs weicom"]
    for t in tasks:
        s = res.summary(t)
        print(f"\n{t} (test split, λ chosen on val):")
        print(s[[c for c in cols if c in s.columns]].to_string())
    if res.skipped:
        print("\nskipped: " + "; ".join(f"{k} ({v})" for k, v in res.skipped.items()))
    print(f"\nwritten to {out}/: " + ", ".join(sorted(p.name for p in written.values())))


def register_composed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "composed",
        help="composed retrieval on real tiles (UCM multi-labels) and the fusion ablation",
        description=(
            "Queries 'class-C tile without label L + \"with L\"' (relevant: the class-C tiles "
            "with L) and 'with L + \"without L\"', every method at every λ; λ chosen on a val "
            "half of the tiles, test half reported. With --patterncom, the same ablation on "
            "PatternCom-format features."
        ),
    )
    p.add_argument("--data", metavar="DIR",
                   help="UCM folder with images/, multilabels.csv, captions.jsonl "
                        "(default: $RSCIR_SHARED_DATA/ucm16)")
    p.add_argument("--store", metavar="DIR", help="store of the images (built if absent)")
    add_model_args(p)
    p.add_argument("--subset", choices=["all", "heldout"], default="all",
                   help="archive: every tile, or only the captions-test tiles no rscir-mini "
                        "training source saw (default %(default)s)")
    p.add_argument("--tasks", nargs="+", default=["add", "remove"], choices=["add", "remove"])
    p.add_argument("--min-relevant", type=int, default=None,
                   help="tiles needed on each side of a label (default 5; 3 with heldout)")
    p.add_argument("--patterncom", metavar="DIR",
                   help="run on a PatternNet/PatternCom tree instead (with --features)")
    p.add_argument("--features", metavar="FILE", help="PatternCom: store dir or features pickle")
    p.add_argument("--text-features", metavar="FILE", help="PatternCom: text features file")
    _add_fusion_args(p)
    _add_output_args(p)
    p.set_defaults(func=cmd_composed)


def cmd_composed(a: argparse.Namespace) -> int:
    from ..bench.composed import archive_from_store, run_composed, run_patterncom_ablation
    from ..bench.patterncom import parse_lams
    from ..bench.report import write_composed_report

    lams = parse_lams(a.lams)
    opts = _fusion_options(a)
    methods = _check_methods(a.methods)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = None if a.no_progress else (lambda m: print(f"  {m}", file=sys.stderr))
    if a.patterncom:
        if not a.features:
            raise InvalidArgumentError("--patterncom needs --features (and --text-features or a store)")
        db, texts, meta = _inputs_from_files(a)
        res = run_patterncom_ablation(a.patterncom, db, texts, methods=methods, lams=lams,
                                      options=opts, seed=a.seed, progress=progress,
                                      encode_texts=texts if callable(texts) else None)
        meta.update(data=str(a.patterncom))
        title = "Fusion ablation on PatternCom-format features"
    else:
        from ..bench.rsir import default_data_dir

        data = Path(a.data) if a.data else default_data_dir() / "ucm16"
        store_dir, enc = _store_and_encoder(a, data / "images", out)
        min_rel = a.min_relevant or (3 if a.subset == "heldout" else 5)
        res = run_composed(data, archive_from_store(store_dir), enc.encode_texts,
                           methods=methods, lams=lams, subset=a.subset, tasks=a.tasks,
                           min_relevant=min_rel, options=opts, seed=a.seed, progress=progress)
        meta = {"data": str(data), "store": str(store_dir), "model": enc.info.name,
                "subset": a.subset, "min_relevant": min_rel}
        title = f"Composed retrieval on real tiles ({a.subset})"
    written = write_composed_report(res, out, title=title, meta=meta,
                                    average_tasks=bool(a.patterncom))
    _print_summary(res, written, out, a.json,
                   f"{title}: {res.n_database} items, {len(res.queries)} pairs, "
                   f"{res.seconds:.1f} s", average=bool(a.patterncom))
    return 0


def register_xview2(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "xview2-cir",
        help="the xView2-CIR change-centric protocol (pre-disaster tile + text -> post tile)",
        description=(
            "xview2_cir.csv (image,query_default,query_alt1,query_alt2,target) under the "
            "xView2 root: each pre-disaster image plus each text column is a query, the "
            "post-disaster image of the same place its only relevant item. Recall@1/5/10 and "
            "mAP per method and text column; λ chosen on a val half of each event's queries."
        ),
    )
    p.add_argument("--data", required=True, metavar="DIR",
                   help="xView2 root: the CSV paths (test/images/...) are relative to it")
    p.add_argument("--csv", metavar="FILE", help="the CSV (default: DIR/xview2_cir.csv)")
    p.add_argument("--store", metavar="DIR", help="store of the root's images (built if absent)")
    add_model_args(p)
    p.add_argument("--columns", nargs="+", default=["query_default", "query_alt1", "query_alt2"],
                   choices=["query_default", "query_alt1", "query_alt2"])
    p.add_argument("--gallery", choices=["all", "targets"], default="all",
                   help="all CSV images (pre and post), or the targets only (default %(default)s)")
    p.add_argument("--keep-query", action="store_true",
                   help="keep the query image in its own ranking")
    _add_fusion_args(p)
    _add_output_args(p)
    p.set_defaults(func=cmd_xview2)


def cmd_xview2(a: argparse.Namespace) -> int:
    from ..bench.patterncom import parse_lams
    from ..bench.report import write_composed_report
    from ..bench.xview2 import archive_for_gallery, run_xview2

    lams = parse_lams(a.lams)
    opts = _fusion_options(a)
    methods = _check_methods(a.methods)
    data, out = Path(a.data), Path(a.out)
    csv_path = Path(a.csv) if a.csv else data / "xview2_cir.csv"
    if not csv_path.is_file():
        raise PathNotFoundError(f"{csv_path} does not exist (pass --csv FILE)")
    out.mkdir(parents=True, exist_ok=True)
    store_dir, enc = _store_and_encoder(a, data, out)
    progress = None if a.no_progress else (lambda m: print(f"  {m}", file=sys.stderr))
    res = run_xview2(csv_path, lambda paths: archive_for_gallery(store_dir, paths),
                     enc.encode_texts, methods=methods, lams=lams, columns=a.columns,
                     gallery=a.gallery, keep_query=a.keep_query, options=opts, seed=a.seed,
                     progress=progress)
    meta = {"csv": str(csv_path), "store": str(store_dir), "model": enc.info.name,
            "gallery": a.gallery, "keep_query": a.keep_query}
    title = "xView2-CIR"
    written = write_composed_report(res, out, title=title, meta=meta)
    _print_summary(res, written, out, a.json,
                   f"{title}: gallery of {res.n_database} images, {len(res.queries)} queries, "
                   f"{res.seconds:.1f} s")
    return 0
