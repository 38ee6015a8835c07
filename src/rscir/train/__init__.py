"""Contrastive training of image towers against a frozen text tower (``rscir train``).

``data`` reads image–caption pairs (captions files, class folders with templates, multi-label
phrases), ``towers`` defines the trainable image towers and the frozen text tower, ``loop``
trains with symmetric InfoNCE and resumable checkpoints, ``metrics`` scores held-out retrieval
and ``recipe`` ties them together.
"""

from __future__ import annotations

import importlib
from typing import Any

# Exported lazily (PEP 562): the CLI reads defaults from ``data`` without importing torch.
_WHERE = {
    "PairSet": "data", "Vocabulary": "data", "read_captions": "data",
    "read_class_folders": "data", "read_multilabels": "data",
    "TrainConfig": "loop", "Trainer": "loop", "contrastive_loss": "loop",

    "evaluate_embeddings": "metrics", "image_map": "metrics", "recall_at_k": "metrics",
    "DataSources": "recipe", "train_tower": "recipe",
    "ImageTower": "towers", "MiniLMText": "towers", "TowerConfig": "towers",
    "build_tower": "towers", "export_tower": "towers", "load_tower": "towers",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod = "..encoders.towers" if _WHERE[name] == "towers" else f".{_WHERE[name]}"
    return getattr(importlib.import_module(mod, __name__), name)


__all__ = [
    "DataSources",
    "ImageTower",
    "MiniLMText",
    "PairSet",
    "TowerConfig",
    "TrainConfig",
    "Trainer",
    "Vocabulary",
    "build_tower",
    "contrastive_loss",
    "evaluate_embeddings",
    "export_tower",
    "image_map",
    "load_tower",
    "read_captions",
    "read_class_folders",
    "read_multilabels",
    "recall_at_k",
    "train_tower",
]
