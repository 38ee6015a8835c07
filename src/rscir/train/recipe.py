"""From data sources and settings to a trained, exported tower: what ``rscir train`` runs."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..encoders.towers import MiniLMText, TowerConfig, build_tower
from ..errors import InvalidArgumentError
from .data import (
    DEFAULT_MULTILABEL_TEMPLATE,
    DEFAULT_TEMPLATES,
    PairSet,
    Vocabulary,
    heldout_images,
    read_captions,
    read_class_folders,
    read_multilabels,
)
from .loop import MODEL_NAME, History, TrainConfig, Trainer, load_inputs, make_split
from .loop import embed_vocabulary as _embed_vocabulary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSources:
    """Where training pairs come from; images of ``heldout_split`` never reach training."""

    captions: tuple[str, ...] = ()
    class_folders: tuple[str, ...] = ()
    multilabels: tuple[str, ...] = ()
    image_root: str | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    multilabel_template: str = DEFAULT_MULTILABEL_TEMPLATE
    phrases: dict[str, str] = field(default_factory=dict)
    train_splits: tuple[str, ...] = ("train",)
    heldout_split: str = "test"
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not (self.captions or self.class_folders or self.multilabels):
            raise InvalidArgumentError(
                "no training data: give --captions FILE, --class-folders DIR and/or --multilabels CSV"
            )


@dataclass
class PreparedData:
    train: PairSet
    val: PairSet
    test: PairSet
    vocab: Vocabulary


def prepare_pairs(src: DataSources, seed: int) -> PreparedData:
    """Read every source, drop held-out (test-split) images everywhere, split off validation."""
    test = PairSet.merge(
        heldout_images(f, root=src.image_root, splits=(src.heldout_split,)) for f in src.captions
    )
    sets: list[PairSet] = [
        read_captions(f, root=src.image_root, splits=src.train_splits) for f in src.captions
    ]
    sets += [read_class_folders(d, templates=src.templates, phrases=src.phrases)
             for d in src.class_folders]
    sets += [
        read_multilabels(f, root=src.image_root, template=src.multilabel_template,
                         phrases=src.phrases)
        for f in src.multilabels
    ]
    pool = PairSet.merge(sets).without(test.paths)
    if len(pool) < 4:
        raise InvalidArgumentError(f"only {len(pool)} training images after removing held-out images")
    train, val = pool.split(src.val_fraction, seed)
    return PreparedData(train, val, test, Vocabulary.build(train, val, test))


@dataclass
class TrainResult:
    history: History
    model_path: Path | None
    data: PreparedData
    trainer: Trainer


def train_tower(
    sources: DataSources,
    tower_config: TowerConfig,
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    workers: int = 0,
    progress: bool = True,
    text_model: Any | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> TrainResult:
    """Prepare data, embed captions with the frozen text tower, train, export
    ``out_dir/model.safetensors`` and write ``out_dir/metrics.json``."""
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    say = log_fn or (lambda msg: log.info(msg))
    data = prepare_pairs(sources, config.seed)
    say(f"train: {data.train.summary()}; validation: {data.val.summary()}; "
        f"held-out test: {data.test.summary()}")
    if tower_config.train_text:
        tower_config, text_emb, text_info = _open_clip_text(tower_config, data.vocab.texts)
    else:
        text_model = text_model or MiniLMText(device=_text_device(config.device))
        if tower_config.embed_dim != text_model.dim:
            raise InvalidArgumentError(
                f"tower embed_dim {tower_config.embed_dim} != text tower dim {text_model.dim}"
            )
        text_emb = _embed_vocabulary(data.vocab.texts, text_model, cache)
        text_info = {"name": text_model.name, "fingerprint": text_model.fingerprint()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        tower = build_tower(tower_config)
    splits = {}
    for name, s in (("train", data.train), ("val", data.val), ("test", data.test)):
        inputs = load_inputs(s.paths, tower.input, cache, workers=workers, progress=progress,
                             desc=f"decode {name}")
        splits[name] = make_split(s, data.vocab, inputs) if len(s) else None
    train_split = splits["train"]
    if train_split is None:
        raise InvalidArgumentError("no training pairs: give captions, class folders or "
                                   "multi-labels with images")
    tower.fit_input_stats(train_split.inputs)
    data_key = json.dumps([data.train.fingerprint(), data.val.fingerprint()])
    trainer = Trainer(
        tower, text_emb, data.vocab.group_of, train_split, config,
        val=splits["val"], test=splits["test"], out_dir=out, data_key=data_key,
        text_info=text_info, progress=progress,
    )

    def on_epoch(row: dict[str, Any]) -> None:
        say(format_row(row, epochs=config.epochs))

    history = trainer.fit(resume=resume, on_epoch=on_epoch)
    final = history.last()
    extra = {
        "data": {"train": data.train.summary(), "val": data.val.summary(),
                 "test": data.test.summary()},
        "train_config": asdict(config),
    }
    model_path = trainer.export(out / MODEL_NAME, extra=extra)
    if trainer.trains_text:  # the whole fine-tuned open_clip model, for --arch/--checkpoint
        clip_path = out / OPEN_CLIP_NAME
        torch.save(trainer.tower.net.clip.state_dict(), clip_path.with_suffix(".tmp"))
        os.replace(clip_path.with_suffix(".tmp"), clip_path)
        say(f"wrote {clip_path} (use: rscir index FOLDER --arch {tower_config.arch} "
            f"--checkpoint {clip_path})")
        model_path = clip_path
    (out / "metrics.json").write_text(json.dumps({
        "initial": history.rows[0], "final": final, **extra,
        "tower": json.loads(tower_config.to_json()),
        "sources": asdict(sources),
    }, indent=1))
    say(f"wrote {model_path}")
    return TrainResult(history, model_path, data, trainer)


OPEN_CLIP_NAME = "open_clip_model.pt"


def _open_clip_text(
    cfg: TowerConfig, texts: list[str]
) -> tuple[TowerConfig, torch.Tensor, dict[str, str]]:
    """Token table for training an open_clip model's own text tower; the tower's embedding
    size becomes the model's."""
    import open_clip

    from ..encoders.openclip import add_rscir_configs

    add_rscir_configs()
    assert cfg.arch is not None
    mcfg = open_clip.get_model_config(cfg.arch)
    if mcfg is None:
        raise InvalidArgumentError(f"unknown open_clip architecture {cfg.arch!r}")
    cfg = TowerConfig(**{**asdict(cfg), "embed_dim": int(mcfg["embed_dim"])})
    tokens = open_clip.get_tokenizer(cfg.arch)(texts)
    return cfg, tokens, {"name": f"open_clip:{cfg.arch}", "fingerprint": "trained"}


def heldout_set(src: DataSources) -> PairSet:
    """The images (with captions) of the captions files' held-out split."""
    if not src.captions:
        raise InvalidArgumentError("evaluation needs --captions FILE with a held-out split")
    test = PairSet.merge(
        heldout_images(f, root=src.image_root, splits=(src.heldout_split,)) for f in src.captions
    )
    if not len(test):
        raise InvalidArgumentError(f"no images in split {src.heldout_split!r} of {', '.join(src.captions)}")
    return test


def evaluate_encoder(encoder: Any, pairs: PairSet, batch_size: int = 64) -> dict[str, Any]:
    """Held-out numbers for any :class:`~rscir.encoders.Encoder`; image-only encoders (no text
    tower) get image-to-image mAP only."""
    from ..ingest.images import load_image
    from .metrics import evaluate_embeddings

    embs = []
    for i in range(0, len(pairs), batch_size):
        ims = [load_image(p)[0] for p in pairs.paths[i : i + batch_size]]
        embs.append(encoder.encode_images(ims))
    emb = np.concatenate(embs) if embs else np.zeros((0, encoder.dim), np.float32)
    try:
        encoder.encode_texts(["probe"])
        embed_texts: Callable[[list[str]], np.ndarray] | None = encoder.encode_texts
    except (NotImplementedError, RuntimeError, ValueError):
        embed_texts = None
    metrics: dict[str, Any] = dict(evaluate_embeddings(emb, pairs.captions, pairs.labels, embed_texts))
    metrics["model"] = encoder.info.name
    metrics["fingerprint"] = encoder.info.fingerprint
    return metrics


def _text_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


KEY_METRICS = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2i_mAP", "t2i_strict_R@10")


def format_row(
    row: dict[str, Any], keys: Sequence[str] = KEY_METRICS, epochs: int | None = None
) -> str:
    """One log line per history row: ``before training | loss …`` for row 0 (the untrained
    tower), then ``epoch 1/N | loss …`` (the epoch's mean training loss)."""
    e = int(row["epoch"])
    head = "before training" if e == 0 else f"epoch {e}/{epochs}" if epochs else f"epoch {e}"
    parts = [head]
    if "loss" in row:
        parts.append(f"loss {row['loss']:.4f}")
    parts.append(f"T {row.get('temperature', float('nan')):.4f}")
    for prefix in ("val", "test"):
        vals = [f"{k} {row[f'{prefix}_{k}']:.3f}" for k in keys if f"{prefix}_{k}" in row]
        if vals:
            parts.append(f"{prefix}: " + ", ".join(vals))
    return " | ".join(parts)
