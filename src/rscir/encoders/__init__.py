"""Encoders: one interface (``encode_images``/``encode_texts``) over model backends."""

from .base import Encoder, ModelInfo, ModelMismatchError, ModelUnavailableError, l2_normalize
from .registry import ModelRegistry, ModelSpec, default_registry, load_encoder

__all__ = [
    "Encoder",
    "ModelInfo",
    "ModelMismatchError",
    "ModelRegistry",
    "ModelSpec",
    "ModelUnavailableError",
    "default_registry",
    "l2_normalize",
    "load_encoder",
]
