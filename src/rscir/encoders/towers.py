"""Image towers trained by ``rscir train`` and the frozen text towers they are aligned to.

An image tower is an ``nn.Module`` plus its *input pipeline* (an ``ImageInput``):

* ``load(pil)`` turns a decoded image into what is cached for training (uint8 pixels a little
  larger than the crop, or a descriptor vector), so decoding happens once per training run;
* ``batch(cached, train=..., generator=...)`` turns a batch of cached items into the module's
  input, with rotation/flip/crop augmentation when training;
* ``__call__(pil)`` is ``batch([load(pil)], train=False)`` for one image: the picklable
  ``preprocess`` of the resulting encoder. Inference therefore sees exactly the eval pipeline
  the held-out numbers were measured with.

Towers: ``cnn`` (a small CNN from scratch at low resolution), ``descriptor`` (the hand-crafted
colour/texture descriptor of :mod:`rscir.features.handcrafted` followed by an MLP) and
``open_clip`` (any open_clip image tower, fine-tuned, with a linear projection when its width
differs from the text space).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import InvalidArgumentError
from .minilm import MiniLMText as MiniLMText  # the frozen text tower (re-exported)
from .tower_meta import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    WEIGHTS_FORMAT,
    TowerConfig,
    descriptor_input_repr,
    pixel_input_repr,
    read_tower_meta,
)
from .tower_meta import TOWER_KINDS as TOWER_KINDS

# ---------------------------------------------------------------------------------------------
# input pipelines (picklable: they run in DataLoader workers as an encoder's ``preprocess``)


def _square_resize(pil: Image.Image, side: int) -> np.ndarray:
    """Shorter side to ``side`` (antialiased), centre crop to a square: (side, side, 3) uint8."""
    im = pil.convert("RGB")
    w, h = im.size
    s = side / min(w, h)
    nw, nh = max(side, round(w * s)), max(side, round(h * s))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (nw - side) // 2, (nh - side) // 2
    return np.asarray(im.crop((left, top, left + side, top + side)), dtype=np.uint8)


def dihedral(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 rotations/flips (code 0..7) per item of an (B, C, H, W) square batch.

    Overhead imagery has no "up": all 8 are valid views of the same scene."""
    out = x.clone()
    for c in range(1, 8):  # 7 masked ops per batch, not one per item
        m = codes == c
        if bool(m.any()):
            v = x[m]
            if c >= 4:
                v = v.flip(-1)
            out[m] = torch.rot90(v, c % 4, dims=(-2, -1))
    return out


class PixelInput:
    """Resize to ``size + pad`` once; crop ``size`` (random when training, centre otherwise)."""

    def __init__(self, size: int, pad: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.pad = int(size), int(pad)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @property
    def cache_shape(self) -> tuple[int, ...]:
        s = self.size + self.pad
        return (s, s, 3)

    cache_dtype = np.uint8

    def load(self, pil: Image.Image) -> np.ndarray:
        return _square_resize(pil, self.size + self.pad)

    def batch(
        self, cached: torch.Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> (B, 3, size, size) float, normalized (and augmented)."""
        b, s = cached.shape[0], cached.shape[1]
        n = self.size
        if train and s > n:
            oy = torch.randint(0, s - n + 1, (b,), generator=generator)
            ox = torch.randint(0, s - n + 1, (b,), generator=generator)
        else:
            oy = ox = torch.full((b,), (s - n) // 2, dtype=torch.long)
        ar = torch.arange(n)
        rows = (oy[:, None] + ar)[:, :, None]
        cols = (ox[:, None] + ar)[:, None, :]
        x = cached[torch.arange(b)[:, None, None], rows, cols]  # (B, n, n, 3), vectorized crop
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if train:
            x = dihedral(x, torch.randint(0, 8, (b,), generator=generator))
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, pil: Image.Image) -> torch.Tensor:
        return self.batch(torch.from_numpy(np.array(self.load(pil)))[None], train=False)[0]

    def __repr__(self) -> str:
        return pixel_input_repr(self.size, self.pad, self.mean, self.std)


class DescriptorInput:
    """The hand-crafted descriptor of an image (computed once; it is rotation-invariant by
    construction except for per-orientation Gabor energies, so no pixel augmentation)."""

    cache_dtype = np.float32

    def __init__(self, descriptor_config: dict[str, Any] | None = None) -> None:
        self.descriptor_config = dict(descriptor_config or {})
        self._descriptor: Any = None

    def _desc(self) -> Any:
        if self._descriptor is None:
            from .descriptor_tower import descriptor_from_config

            self._descriptor = descriptor_from_config(self.descriptor_config)
        return self._descriptor

    def __getstate__(self) -> dict[str, Any]:
        return {"descriptor_config": self.descriptor_config, "_descriptor": None}

    @property
    def dim(self) -> int:
        return int(self._desc().dim)

    @property
    def cache_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def load(self, pil: Image.Image) -> np.ndarray:
        return self._desc()([pil])[0]

    def load_many(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self._desc()(list(images))

    def batch(
        self, cached: torch.Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return cached.float()

    def __call__(self, pil: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.load(pil))

    def __repr__(self) -> str:
        return descriptor_input_repr(self.descriptor_config)


ImageInput = PixelInput | DescriptorInput


# ---------------------------------------------------------------------------------------------
# networks


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Four VGG-style stages (width, 2w, 4w, 8w channels, 2x downsampling each), global
    average + max pooling, then a 2-layer head into the text space."""

    def __init__(self, embed_dim: int, width: int = 32, hidden: int = 1024, dropout: float = 0.1):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        stages: list[nn.Module] = []
        for i in range(4):
            stages.append(_block(chans[i], chans[i + 1]))
            if i < 3:
                stages.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.Linear(2 * chans[-1], hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)


class DescriptorMLP(nn.Module):
    """Standardize the descriptor with training statistics (buffers, so they ship with the
    weights), then a 2-layer MLP into the text space."""

    def __init__(self, in_dim: int, embed_dim: int, hidden: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, embed_dim),
        )

    @torch.no_grad()
    def fit_input_stats(self, features: torch.Tensor) -> None:
        f = features.double()
        self.mean.copy_(f.mean(0).float())
        self.std.copy_(f.std(0).clamp_min(1e-6).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class OpenClipImageTower(nn.Module):
    """An open_clip image tower (optionally initialized from a local checkpoint) plus a linear
    projection into the text space when the widths differ. With ``with_text`` the whole
    open_clip model is kept and its own text tower is trained too (``encode_text``)."""

    def __init__(
        self, arch: str, embed_dim: int, init_checkpoint: str | None = None,
        with_text: bool = False,
    ):
        super().__init__()
        import open_clip

        from .openclip import add_rscir_configs, load_state_dict

        add_rscir_configs()
        if arch not in open_clip.list_models():
            raise InvalidArgumentError(f"unknown open_clip architecture {arch!r}")
        model = open_clip.create_model(arch, pretrained=None)
        if init_checkpoint:
            model.load_state_dict(load_state_dict(init_checkpoint), strict=False)
        out = int(getattr(model, "embed_dim", 0) or model.text_projection.shape[1])
        self.with_text = with_text
        if with_text:
            if out != embed_dim:
                raise InvalidArgumentError(f"{arch} embeds in {out} dimensions; the tower's embed_dim is {embed_dim}")
            self.clip = model
        else:
            self.visual = model.visual
        self.proj = nn.Identity() if out == embed_dim else nn.Linear(out, embed_dim, bias=False)
        visual = model.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        self.image_mean = tuple(getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        self.image_std = tuple(getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
        self.embed_width = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_text:
            return self.clip.encode_image(x)
        return self.proj(self.visual(x))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)


class ImageTower(nn.Module):
    """A network plus the input pipeline it was trained with."""

    def __init__(self, config: TowerConfig, net: nn.Module, input: ImageInput) -> None:
        super().__init__()
        self.config = config
        self.net = net
        self.input = input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def fit_input_stats(self, cached: torch.Tensor) -> None:
        """Learn input statistics from the training set (descriptor standardization)."""
        if isinstance(self.net, DescriptorMLP):
            self.net.fit_input_stats(cached.float())

    @property
    def trains_text(self) -> bool:
        return bool(getattr(self.net, "with_text", False))

    @property
    def arch_name(self) -> str:
        return self.config.arch_name


def build_tower(config: TowerConfig) -> ImageTower:
    """A freshly initialized tower (uses the global torch RNG: seed it first)."""
    if config.kind == "cnn":
        net: nn.Module = SmallCNN(config.embed_dim, config.width, config.hidden, config.dropout)
        inp: ImageInput = PixelInput(config.image_size, config.pad, IMAGENET_MEAN, IMAGENET_STD)
    elif config.kind == "descriptor":
        inp = DescriptorInput(config.descriptor)
        net = DescriptorMLP(inp.dim, config.embed_dim, config.hidden, config.dropout)
    else:
        assert config.arch is not None
        oc = OpenClipImageTower(config.arch, config.embed_dim, config.init_checkpoint,
                                with_text=config.train_text)
        pad = max(0, round(oc.image_size * 0.125)) if config.pad else 0
        inp = PixelInput(oc.image_size, pad, oc.image_mean, oc.image_std)
        net = oc
    return ImageTower(config, net, inp)


def embed_cached(
    tower: ImageTower, cached: torch.Tensor, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """L2-normalized eval-mode embeddings of cached inputs, (N, D) float32 on the CPU."""
    was_training = tower.training
    tower.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(cached), batch_size):
            x = tower.input.batch(cached[i : i + batch_size], train=False).to(device)
            out.append(F.normalize(tower(x).float(), dim=-1).cpu())
    tower.train(was_training)
    if not out:
        return torch.zeros((0, tower.config.embed_dim))
    return torch.cat(out)


# --------------------------------------------------------------------------- weights files
def export_tower(
    tower: ImageTower,
    path: str | os.PathLike[str],
    *,
    text: dict[str, str] | None = None,
    meta: dict[str, str] | None = None,
) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in tower.state_dict().items()}
    metadata = {
        "format": WEIGHTS_FORMAT,
        "tower": tower.config.to_json(),
        "text_model": (text or {}).get("name", ""),
        "text_fingerprint": (text or {}).get("fingerprint", ""),
        **(meta or {}),
    }
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # a shipped/installed weights file, readable by all
    os.replace(tmp, path)
    return path


def load_tower(path: str | os.PathLike[str]) -> tuple[ImageTower, dict[str, str]]:
    """Rebuild an exported tower (safetensors, no pickle) and return it with its metadata."""
    from safetensors.torch import load_file

    from ..errors import UntrustedFileError
    from .weightfiles import error_summary

    path = str(path)
    cfg, meta = read_tower_meta(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tower = build_tower(cfg)
    try:
        sd = load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError: truncated or damaged tensors
        raise UntrustedFileError(f"{path} is a damaged safetensors file "
                                 f"({error_summary(e)}): copy it again") from None
    try:
        missing, unexpected = tower.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches: name the first one, on one line
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if ln.startswith("size mismatch")), lines[0])
        raise InvalidArgumentError(f"{path}: its weights do not fit the tower it describes ({why}); the "
                         "file is damaged") from None
    if missing or unexpected:
        raise InvalidArgumentError(f"{path}: its weights do not fit the tower it describes (missing "
                         f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]}); the file is "
                         "damaged or was not written by `rscir train`")
    return tower.eval(), meta
