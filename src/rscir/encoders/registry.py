"""Named models and where their weights come from, in the spirit of open_clip's pretrained
registry: data only. A registry is a plain object (no module state); :mod:`.builtin` fills one
with rscir's models and backends, and tests and applications can add their own. This module
imports no backend, so backends can import it without a cycle."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import InvalidArgumentError, ModelUnavailableError
from .base import Encoder, ModelInfo


@dataclass(frozen=True)
class ModelSpec:
    """A named model: backend, architecture and weight source."""

    name: str
    arch: str
    backend: str = "open_clip"
    hub_repo: str | None = None
    hub_file: str | None = None
    open_clip_tag: str | None = None
    random_seed: int | None = None
    checkpoint: str | None = None
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadOptions:
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64


Loader = Callable[[ModelSpec, LoadOptions], Encoder]


REMOTECLIP_REPO = "chendelong/RemoteCLIP"
GEORSCLIP_REPO = "Zilun/GeoRSCLIP"

BUILTIN_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("clip-vit-b-32", "ViT-B-32", open_clip_tag="openai", description="OpenAI CLIP ViT-B/32"),
    ModelSpec("clip-vit-l-14", "ViT-L-14", open_clip_tag="openai", description="OpenAI CLIP ViT-L/14"),
    ModelSpec("remoteclip-rn50", "RN50", hub_repo=REMOTECLIP_REPO, hub_file="RemoteCLIP-RN50.pt",
              description="RemoteCLIP RN50 (Liu et al., TGRS 2024)"),
    ModelSpec("remoteclip-vit-b-32", "ViT-B-32", hub_repo=REMOTECLIP_REPO,
              hub_file="RemoteCLIP-ViT-B-32.pt", description="RemoteCLIP ViT-B/32"),
    ModelSpec("remoteclip-vit-l-14", "ViT-L-14", hub_repo=REMOTECLIP_REPO,
              hub_file="RemoteCLIP-ViT-L-14.pt", description="RemoteCLIP ViT-L/14"),
    ModelSpec("georsclip-vit-b-32", "ViT-B-32", hub_repo=GEORSCLIP_REPO,
              hub_file="ckpt/RS5M_ViT-B-32.pt", description="GeoRSCLIP ViT-B/32 (RS5M)"),
    ModelSpec("georsclip-vit-l-14", "ViT-L-14", hub_repo=GEORSCLIP_REPO,
              hub_file="ckpt/RS5M_ViT-L-14.pt", description="GeoRSCLIP ViT-L/14 (RS5M)"),
    ModelSpec("rscir-tiny", "RSCIR-Tiny", random_seed=0,
              description="tiny randomly initialized open_clip model for tests (no real semantics)"),
)


@dataclass
class ModelRegistry:
    """Model specs by name and loaders by backend."""

    specs: dict[str, ModelSpec] = field(default_factory=dict)
    loaders: dict[str, Loader] = field(default_factory=dict)
    default_model: str | None = None

    def register(self, spec: ModelSpec) -> None:
        self.specs[spec.name] = spec

    def register_backend(self, backend: str, loader: Loader) -> None:
        self.loaders[backend] = loader

    def names(self) -> list[str]:
        return sorted(self.specs)

    def resolve(
        self,
        name: str | None = None,
        *,
        arch: str | None = None,
        checkpoint: str | None = None,
    ) -> ModelSpec:
        """The spec to load: a registry name (optionally with a local checkpoint overriding its
        hub source), or any open_clip architecture with a local checkpoint."""
        if name is None and arch is None:
            if self.default_model is None:
                raise ModelUnavailableError(
                    "no model given and no default model is available: pass --model NAME "
                    f"(one of {', '.join(self.names())}) or --arch ARCH --checkpoint FILE"
                )
            name = self.default_model
        if name is not None:
            if name not in self.specs:
                raise ModelUnavailableError(
                    f"unknown model {name!r}; known: {', '.join(self.names())} "
                    "(or use --arch ARCH --checkpoint FILE for any open_clip architecture)"
                )
            spec = self.specs[name]
            if arch is not None and arch != spec.arch:
                raise ModelUnavailableError(
                    f"model {name!r} has architecture {spec.arch!r}, not {arch!r}"
                )
            if checkpoint is not None:
                spec = replace(spec, checkpoint=checkpoint, random_seed=None)
            return spec
        if checkpoint is None:
            raise ModelUnavailableError(
                f"--arch {arch} needs --checkpoint FILE (a local open_clip state dict)"
            )
        return ModelSpec(name=f"open_clip:{arch}", arch=str(arch), checkpoint=checkpoint)

    def args_for_store(
        self,
        info: ModelInfo,
        *,
        model: str | None = None,
        arch: str | None = None,
        checkpoint: str | None = None,
    ) -> tuple[str | None, str | None, str | None]:
        """(model, arch, checkpoint) that rebuild a store's model (``info``, from its manifest)
        without loading it: its registry name, or its architecture with the checkpoint it was
        built from. Arguments the user gave win; a checkpoint alone keeps the store's model."""
        if model is not None or arch is not None:
            return model, arch, checkpoint
        src = info.source or ""
        if checkpoint is None and src and os.path.isabs(src):
            if not os.path.isfile(src):
                raise ModelUnavailableError(
                    f"the store was built from checkpoint {src}, which is missing; "
                    "pass --checkpoint FILE with the same weights")
            checkpoint = src
        if info.name in self.specs:
            return info.name, None, checkpoint
        return None, info.arch, checkpoint

    def load(
        self,
        name: str | None = None,
        *,
        arch: str | None = None,
        checkpoint: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 64,
    ) -> Encoder:
        spec = self.resolve(name, arch=arch, checkpoint=checkpoint)
        if spec.backend not in self.loaders:
            raise ModelUnavailableError(f"no loader for backend {spec.backend!r}")
        if precision not in ("auto", "fp32") and spec.backend != "open_clip":
            raise InvalidArgumentError(
                f"model {spec.name!r} runs in fp32 only; drop --precision {precision}")
        return self.loaders[spec.backend](spec, LoadOptions(device, precision, batch_size))
