"""Encoders: one interface (``encode_images``/``encode_texts``) over model backends."""

from .base import Encoder, ModelInfo, l2_normalize
from .builtin import default_registry, load_encoder
from .registry import ModelRegistry, ModelSpec

__all__ = [
    "Encoder",
    "ModelInfo",
    "ModelRegistry",
    "ModelSpec",
    "default_registry",
    "l2_normalize",
    "load_encoder",
]
