"""`rscir import`: a precomputed embedding collection (GeoParquet) into a store."""

from __future__ import annotations

import argparse
import json

from .core import add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import", help="import precomputed embeddings (GeoParquet, e.g. Major TOM) into a store",
        description="Import a GeoParquet embedding collection without re-encoding it. --model "
                    "must be the model the collection was made with: it embeds the queries "
                    "(images and texts); the dimension is checked and the model recorded.")
    p.add_argument("file", help="GeoParquet file of embeddings")
    p.add_argument("--store", required=True,
                   help="store directory or postgresql://... URI (created if absent)")
    add_model_args(p)
    p.add_argument("--columns", metavar="KEY=COL,...",
                   help="column mapping over the Major TOM schema, e.g. "
                        "embedding=embeddings,datetime=date,path={source_url}#{date},window= "
                        "(keys: embedding, path, window, geometry, datetime, lon, lat, crs, "
                        "footprint_native, label, labels)")
    p.add_argument("--root", help="folder the item paths are relative to, where local images "
                   "of the items are found for thumbnails (default: the file's folder)")
    p.add_argument("--chunk-rows", type=int, default=65_536,
                   help="rows read and committed at once (bounds memory)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_import)


def cmd_import(a: argparse.Namespace) -> int:
    from ..encoders.builtin import default_registry
    from ..ingest.collections import ColumnMap, import_embeddings
    from ..stores.uri import existing_model

    reg = default_registry()
    info = existing_model(a.store)
    model, arch, checkpoint = a.model, a.arch, a.checkpoint
    if info is not None:
        model, arch, checkpoint = reg.args_for_store(info, model=model, arch=arch,
                                                     checkpoint=checkpoint)
    # loading the model proves it is there to embed queries; its identity goes in the manifest
    enc = reg.load(model, arch=arch, checkpoint=checkpoint, device=a.device)
    rep = import_embeddings(a.file, a.store, enc.info, columns=ColumnMap.parse(a.columns),
                            root=a.root, chunk_rows=a.chunk_rows, dtype=a.dtype,
                            progress=not a.no_progress)
    print(json.dumps(rep.to_dict(), indent=1) if a.json else rep.summary())
    return 0
