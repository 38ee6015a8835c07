"""rscir's own models and backends, registered into a fresh :class:`~.registry.ModelRegistry`.

The only module that knows every backend (open_clip, rscir-mini, classic); the registry itself
stays data only, so no backend import ever loops back to it."""

from __future__ import annotations

from typing import Any

from .base import Encoder
from .registry import BUILTIN_SPECS, LoadOptions, ModelRegistry, ModelSpec


def _load_open_clip(spec: ModelSpec, opts: LoadOptions) -> Encoder:
    from .openclip import OpenClipEncoder, OpenClipSource

    src = OpenClipSource(
        checkpoint=spec.checkpoint,
        hub_repo=spec.hub_repo,
        hub_file=spec.hub_file,
        open_clip_tag=spec.open_clip_tag,
        random_seed=spec.random_seed,
    )
    return OpenClipEncoder(
        spec.name,
        spec.arch,
        src,
        device=opts.device,
        precision=opts.precision,
        batch_size=opts.batch_size,
    )


def default_registry() -> ModelRegistry:
    """A fresh registry with the built-in models and backends."""
    from . import classic, mini  # imported here: the CLI starts without scikit-image

    reg = ModelRegistry()
    reg.register_backend("open_clip", _load_open_clip)
    for spec in BUILTIN_SPECS:
        reg.register(spec)
    mini.register(reg)
    classic.register(reg)
    return reg


def load_encoder(name: str | None = None, **kwargs: Any) -> Encoder:
    """Load a model by registry name, or ``arch=..., checkpoint=...`` for any open_clip model."""
    return default_registry().load(name, **kwargs)
