"""``rscir train``: contrastive training of an image tower against the frozen MiniLM text tower
(locked-text tuning), on captions files, class folders and/or multi-label CSVs.

Examples::

    rscir train runs/mini --captions data/captions.jsonl --class-folders data/scenes
    rscir train runs/mini ...            # run again after an interruption: resumes
    rscir train runs/eval --captions data/captions.jsonl --evaluate rscir-mini
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..train.data import DEFAULT_MULTILABEL_TEMPLATE, DEFAULT_TEMPLATES


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``rscir train`` to the rscir parser."""
    p = sub.add_parser(
        "train",
        help="train an image tower against the frozen MiniLM text tower",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", metavar="OUT_DIR", help="run folder: checkpoint, history, model file")
    d = p.add_argument_group("data (images of the held-out split never reach training)")
    d.add_argument("--captions", action="append", default=[], metavar="FILE",
                   help="JSONL/CSV of image path + captions (+ split); repeatable")
    d.add_argument("--class-folders", action="append", default=[], metavar="DIR",
                   help="DIR/<class>/<image>: captions from --template; repeatable")
    d.add_argument("--multilabels", action="append", default=[], metavar="CSV",
                   help="0/1 label CSV: captions from --multilabel-template; repeatable")
    d.add_argument("--image-root", help="folder image paths in the tables are relative to "
                   "(default: the table's folder or its images/ sub-folder)")
    d.add_argument("--template", action="append", default=None, metavar="TEXT",
                   help=f"class caption template with {{class}}; repeatable "
                        f"(default: {' | '.join(DEFAULT_TEMPLATES)})")
    d.add_argument("--multilabel-template", default=DEFAULT_MULTILABEL_TEMPLATE, metavar="TEXT",
                   help="phrase template with {labels} (default: %(default)r)")
    d.add_argument("--phrase", action="append", default=[], metavar="NAME=WORDS",
                   help="words for a class/label name, e.g. riverlake='river or lake'; repeatable")
    d.add_argument("--train-split", action="append", default=None, metavar="NAME",
                   help="captions-file split(s) to train on (default: train)")
    d.add_argument("--heldout-split", default="test", metavar="NAME",
                   help="captions-file split never trained on, reported at the end (default: test)")
    d.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of training images held out for per-epoch metrics")
    t = p.add_argument_group("image tower")
    t.add_argument("--tower", choices=("cnn", "descriptor", "open_clip"), default="cnn")
    t.add_argument("--image-size", type=int, default=64, help="CNN input size in px")
    t.add_argument("--pad", type=int, default=8, help="extra px around the crop (random crops)")
    t.add_argument("--width", type=int, default=32, help="CNN channels of the first stage")
    t.add_argument("--hidden", type=int, default=1024, help="hidden width of the head / MLP")
    t.add_argument("--dropout", type=float, default=0.1)
    t.add_argument("--arch", help="open_clip architecture (with --tower open_clip)")
    t.add_argument("--init-checkpoint", metavar="FILE",
                   help="open_clip weights to fine-tune from (local file)")
    t.add_argument("--train-text", action="store_true",
                   help="with --tower open_clip: train the model's own text tower too, instead "
                        "of aligning to the frozen MiniLM; also writes OUT_DIR/open_clip_model.pt")
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=int, default=20,
                   help="0: no training, export and score the seeded initial tower (a floor)")
    o.add_argument("--batch-size", type=int, default=256)
    o.add_argument("--lr", type=float, default=2e-3)
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--warmup-steps", type=int, default=50)
    o.add_argument("--temperature", type=float, default=0.07, help="initial temperature")
    o.add_argument("--fixed-temperature", action="store_true", help="do not learn it")
    o.add_argument("--no-augment", action="store_true", help="no random crops/rotations/flips")
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    r.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    r.add_argument("--workers", type=int, default=0, help="image decoding worker processes")
    r.add_argument("--cache-dir", help="decoded images / text embeddings (default OUT_DIR/cache)")
    r.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every N steps (always at epoch ends and on Ctrl-C)")
    r.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--install", metavar="PATH",
                   help="also copy the trained weights here (e.g. src/rscir/weights/rscir-mini.safetensors)")
    r.add_argument("--evaluate", metavar="MODEL",
                   help="do not train: score a registry model (e.g. rscir-mini, classic) on the "
                        "held-out split of --captions and write OUT_DIR/eval-MODEL.json")
    r.add_argument("--checkpoint", help="with --evaluate: weights file for the model")
    p.set_defaults(func=run)


def _sources(args: argparse.Namespace) -> Any:
    from ..train.data import parse_phrases
    from ..train.recipe import DataSources

    return DataSources(
        captions=tuple(args.captions),
        class_folders=tuple(args.class_folders),
        multilabels=tuple(args.multilabels),
        image_root=args.image_root,
        templates=tuple(args.template) if args.template else DEFAULT_TEMPLATES,
        multilabel_template=args.multilabel_template,
        phrases=parse_phrases(args.phrase),
        train_splits=tuple(args.train_split) if args.train_split else ("train",),
        heldout_split=args.heldout_split,
        val_fraction=args.val_fraction,
    )


def configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """(TowerConfig, TrainConfig) of parsed ``rscir train`` arguments (what the exported
    weights record, so a recipe can be checked against them)."""
    from ..encoders.towers import TowerConfig
    from ..train.loop import TrainConfig

    tower = TowerConfig(
        kind=args.tower, embed_dim=384, image_size=args.image_size, pad=args.pad,
        width=args.width, hidden=args.hidden, dropout=args.dropout, arch=args.arch,
        init_checkpoint=args.init_checkpoint, train_text=args.train_text,
    )
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, seed=args.seed,
        init_temperature=args.temperature, learn_temperature=not args.fixed_temperature,
        augment=not args.no_augment, save_every=args.save_every, device=args.device,
    )
    return tower, config


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    import torch

    from ..train.recipe import train_tower

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.evaluate:
        return _evaluate(args)
    sources = _sources(args)
    tower, config = configs(args)
    result = train_tower(
        sources, tower, config, args.out, cache_dir=args.cache_dir,
        resume=not args.no_resume, workers=args.workers, progress=not args.no_progress,
        log_fn=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    if args.install and result.model_path is not None:
        dest = Path(args.install)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.model_path, dest)
        print(f"installed {dest}", file=sys.stderr)
    print(json.dumps({k: v for k, v in result.history.last().items()}, indent=1))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..encoders import load_encoder
    from ..train.recipe import evaluate_encoder, heldout_set

    test = heldout_set(_sources(args))
    enc = load_encoder(args.evaluate, checkpoint=args.checkpoint)
    metrics = evaluate_encoder(enc, test)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval-{args.evaluate}.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    return 0
