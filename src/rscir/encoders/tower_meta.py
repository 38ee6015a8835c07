"""What a tower weights file says about its tower, read without torch.

``rscir train`` writes safetensors files whose metadata holds the tower's configuration. An
encoder needs only that (its architecture name, dimension and input pipeline) to describe its
embedding space, so opening a store and checking its model costs a JSON read, and torch is
imported only when an image is actually embedded (:mod:`.towers` builds the network).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import InvalidArgumentError, PathNotFoundError

TOWER_KINDS = ("cnn", "descriptor", "open_clip")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FORMAT = "rscir-tower/1"


@dataclass(frozen=True)
class TowerConfig:
    """Everything needed to rebuild a tower (stored as JSON in exported weights)."""

    kind: str = "cnn"
    embed_dim: int = 384
    image_size: int = 64
    pad: int = 8
    width: int = 32
    hidden: int = 1024
    dropout: float = 0.1
    arch: str | None = None
    init_checkpoint: str | None = None
    train_text: bool = False
    descriptor: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in TOWER_KINDS:
            raise InvalidArgumentError(f"unknown tower {self.kind!r}; choose one of {', '.join(TOWER_KINDS)}")
        if self.kind == "open_clip" and not self.arch:
            raise InvalidArgumentError("the open_clip tower needs an architecture (--arch)")
        if self.train_text and self.kind != "open_clip":
            raise InvalidArgumentError("training the text tower needs --tower open_clip (its own text tower)")
        if self.image_size < 8 or self.pad < 0 or self.embed_dim < 1 or self.width < 1:
            raise InvalidArgumentError(f"bad tower sizes in {self}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TowerConfig:
        d = json.loads(text)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def arch_name(self) -> str:
        """Short architecture name (part of the encoder's ``ModelInfo.arch``)."""
        if self.kind == "cnn":
            return f"cnn{self.image_size}-w{self.width}"
        if self.kind == "descriptor":
            return "descriptor-mlp"
        return f"open_clip-{self.arch}"


def pixel_input_repr(size: int, pad: int, mean: Sequence[float], std: Sequence[float]) -> str:
    """``repr`` of a :class:`~.towers.PixelInput` (recorded in store manifests)."""
    m = tuple(float(x) for x in mean)
    s = tuple(float(x) for x in std)
    return f"PixelInput(size={int(size)}, pad={int(pad)}, mean={m}, std={s})"


def descriptor_input_repr(descriptor_config: dict[str, Any] | None) -> str:
    """``repr`` of a :class:`~.towers.DescriptorInput`."""
    return f"DescriptorInput({dict(descriptor_config or {})})"


def input_repr(config: TowerConfig) -> str | None:
    """The input pipeline's ``repr`` from the configuration alone, or None when it depends on
    a network that must be built (open_clip towers take size and normalization from it)."""
    if config.kind == "cnn":
        return pixel_input_repr(config.image_size, config.pad, IMAGENET_MEAN, IMAGENET_STD)
    if config.kind == "descriptor":
        return descriptor_input_repr(config.descriptor)
    return None


def read_tower_meta(path: str | os.PathLike[str]) -> tuple[TowerConfig, dict[str, str]]:
    """(configuration, metadata) of a tower file written by ``rscir train``: FileNotFoundError
    when absent, :class:`~rscir.errors.UntrustedFileError` (one line naming the fix) when it is
    not such a file. The configuration is the one the loaded tower carries (an open_clip tower's
    initial checkpoint is dropped: its weights come from the file). Reads no tensor."""
    from safetensors import safe_open

    from ..errors import UntrustedFileError
    from .weightfiles import error_summary, weights_format

    path = str(path)
    if not os.path.isfile(path):
        raise PathNotFoundError(f"tower weights not found: {path}")
    want = "rscir-mini takes a model.safetensors written by `rscir train`"
    kind = weights_format(path)
    if kind == "torch":
        raise UntrustedFileError(
            f"{path} is a PyTorch checkpoint, not an rscir-mini tower file; {want}. For an "
            f"open_clip checkpoint, use --arch ARCH --checkpoint {path} instead of --model")
    if kind != "safetensors":
        raise UntrustedFileError(f"{path} is not an rscir-mini tower file ({want})")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - SafetensorError: a damaged file
        raise UntrustedFileError(f"{path} is a damaged safetensors file "
                                 f"({error_summary(e)}): copy it again") from None
    if meta.get("format") != WEIGHTS_FORMAT or "tower" not in meta:
        raise UntrustedFileError(
            f"{path} is a safetensors file but not an rscir-mini tower (no {WEIGHTS_FORMAT!r} "
            f"in its metadata); {want}. For open_clip weights, use --arch ARCH --checkpoint")
    try:
        cfg = TowerConfig.from_json(meta["tower"])
    except (ValueError, TypeError, KeyError) as e:
        raise UntrustedFileError(f"{path}: its tower description cannot be read ({e}); it is "
                                 "damaged or was written by a newer rscir") from None
    if cfg.kind == "open_clip" and cfg.init_checkpoint:
        cfg = replace(cfg, init_checkpoint=None)  # weights come from the file
    return cfg, meta
