"""Contrastive training of image towers against a frozen text tower (``rscir train``).

``data`` reads image–caption pairs (captions files, class folders with templates, multi-label
phrases), ``towers`` defines the trainable image towers and the frozen text tower, ``loop``
trains with symmetric InfoNCE and resumable checkpoints, ``metrics`` scores held-out retrieval
and ``recipe`` ties them together.
"""

from .data import PairSet, Vocabulary, read_captions, read_class_folders, read_multilabels
from .loop import TrainConfig, Trainer, contrastive_loss, export_tower, load_tower
from .metrics import evaluate_embeddings, image_map, recall_at_k
from .recipe import DataSources, train_tower
from .towers import ImageTower, MiniLMText, TowerConfig, build_tower

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
