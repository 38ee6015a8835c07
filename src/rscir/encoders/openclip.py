"""open_clip backend: any open_clip architecture with weights from a local file, the HF hub,
or a seeded random initialization (tests)."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import (
    InvalidArgumentError,
    ModelMismatchError,
    ModelUnavailableError,
    UntrustedFileError,
)
from .base import Encoder, ModelInfo, fingerprint_file
from .inference import CPU_PRECISIONS, InferenceTower
from .text_cache import TextEmbeddingCache
from .weightfiles import SAVE_HINT, error_summary, weights_format

HF_HOST = "huggingface.co"


def add_rscir_configs() -> None:
    """Make the architectures shipped with rscir (e.g. the tiny test model) known to open_clip."""
    import open_clip

    cfg_dir = resources.files("rscir.encoders") / "configs"
    with resources.as_file(cfg_dir) as d:
        if "RSCIR-Tiny" not in open_clip.list_models():
            open_clip.add_model_config(Path(d))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("CUDA was requested but no CUDA device is available; use --device cpu or auto")
    return dev


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((HF_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_file(repo: str, filename: str, *, model_name: str, arch: str) -> str:
    """Path of a hub file from the local HF cache, else downloaded; fails fast when offline."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:  # noqa: BLE001 - any miss in the cache means "not available locally"
        pass
    if not _hub_reachable():
        raise ModelUnavailableError(
            f"model {model_name!r} needs the file {filename!r} from the Hugging Face hub repo "
            f"{repo!r}, which cannot be reached from here (offline). Download it on a connected "
            f"machine and pass it as a local file:\n"
            f"  rscir index FOLDER --model {model_name} --checkpoint /path/to/{Path(filename).name}\n"
            f"or, for any open_clip architecture:\n"
            f"  rscir index FOLDER --arch {arch} --checkpoint /path/to/weights.pt"
        )
    try:
        return hf_hub_download(repo, filename)
    except Exception as e:  # noqa: BLE001
        raise ModelUnavailableError(f"could not download {repo}/{filename}: {e}") from e


def _load_weights_file(path: str) -> Any:
    """The object a weights file holds, loaded without running code from it; every format
    problem is one :class:`UntrustedFileError` that says what to do."""
    kind = weights_format(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends: a damaged file
            raise UntrustedFileError(f"{path} is a damaged safetensors file "
                                     f"({error_summary(e)}): download or copy it again") from None
    if kind == "torch":
        try:
            with open(path, "rb") as f:  # a file object: torch would go by a .safetensors name
                return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UntrustedFileError(
                f"{path} holds Python objects besides tensors ({error_summary(e)}); rscir "
                f"loads weights only, since loading other objects can run code: {SAVE_HINT}"
            ) from None
        except Exception as e:  # noqa: BLE001 - zip and storage errors: a damaged file
            raise UntrustedFileError(f"{path} is a damaged PyTorch checkpoint "
                                     f"({error_summary(e)}): download or copy it again") from None
    if kind == "pickle":
        raise UntrustedFileError(
            f"{path} is a plain Python pickle, not a PyTorch checkpoint or safetensors file; "
            f"rscir does not load pickles, which can run code: {SAVE_HINT}")
    raise UntrustedFileError(
        f"{path} is not a weights file: --checkpoint takes an open_clip state dict saved by "
        "torch.save (.pt, .bin) or a .safetensors file")


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a checkpoint safely (no pickle code execution): plain state dicts, {'state_dict': ...}
    wrappers, DataParallel 'module.' prefixes and .safetensors files (recognised by content)."""
    path = str(path)
    if os.path.isdir(path):
        raise ModelUnavailableError(f"checkpoint {path} is a folder: pass the weights file in it")
    if not os.path.isfile(path):
        raise ModelUnavailableError(f"checkpoint file not found: {path}")
    sd: Any = _load_weights_file(path)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelMismatchError(f"{path} does not hold a state dict (names → tensors): "
                                 f"{SAVE_HINT}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def fingerprint_module(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class OpenClipSource:
    """Where an open_clip model's weights come from (exactly one of the three, or none)."""

    checkpoint: str | None = None
    hub_repo: str | None = None
    hub_file: str | None = None
    open_clip_tag: str | None = None
    random_seed: int | None = None


class _DropRandomInitNotice(logging.Filter):
    """open_clip logs 'No pretrained weights loaded' even when rscir loads weights right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    f = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


class OpenClipEncoder(Encoder):
    """Frozen open_clip model; autocast (bf16/fp16) on CUDA. On CPU images go through an
    :class:`~.inference.InferenceTower` of ``precision`` fp32 (default: fused attention, the same
    embeddings), bf16 or int8 (faster, lossy, opt-in); ``model`` stays open_clip's own."""

    def __init__(
        self,
        name: str,
        arch: str,
        source: OpenClipSource,
        *,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 64,
    ) -> None:
        import open_clip

        add_rscir_configs()
        if arch not in open_clip.list_models():
            raise ModelUnavailableError(
                f"unknown open_clip architecture {arch!r}; see open_clip.list_models()"
            )
        self.device = resolve_device(device)
        self.batch_size = batch_size
        ckpt_path, src_label = self._weights_path(name, arch, source)
        with _quiet_open_clip(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(source.random_seed or 0)
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
        if ckpt_path is not None:
            sd = load_state_dict(ckpt_path)
            try:
                # position ids / logit bias buffers differ across open_clip versions
                missing, unexpected = model.load_state_dict(sd, strict=False)
            except RuntimeError as e:
                raise ModelMismatchError(
                    f"checkpoint {ckpt_path} does not fit architecture {arch!r}: {e}"
                ) from e
            real_missing = [k for k in missing if "position_ids" not in k and "logit_bias" not in k]
            if real_missing or unexpected:
                raise ModelMismatchError(
                    f"checkpoint {ckpt_path} does not fit architecture {arch!r}: "
                    f"missing {real_missing[:5]}, unexpected {list(unexpected)[:5]}"
                )
            fingerprint = fingerprint_file(ckpt_path)
        else:
            fingerprint = fingerprint_module(model)
        self.model = model.eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.precision = self._pick_precision(precision)
        self.image_model = self._image_model()
        dim = int(self.model.text_projection.shape[1]) if hasattr(
            self.model, "text_projection"
        ) and self.model.text_projection is not None else self._probe_dim()
        image_size = getattr(self.model.visual, "image_size", None)
        mean = getattr(self.model.visual, "image_mean", None)
        std = getattr(self.model.visual, "image_std", None)
        self.info = ModelInfo(
            name=name,
            arch=arch,
            fingerprint=fingerprint,
            dim=dim,
            backend="open_clip",
            source=src_label,
            preprocessing={
                "image_size": list(image_size) if isinstance(image_size, tuple) else image_size,
                "mean": list(mean) if mean is not None else None,
                "std": list(std) if std is not None else None,
                "transform": repr(preprocess).replace("\n", " "),
                "precision": self.precision,
            },
        )
        self.text_cache = TextEmbeddingCache.for_model(
            self.info, variant=f"{self.device.type}:{self.precision}")

    @staticmethod
    def _weights_path(name: str, arch: str, s: OpenClipSource) -> tuple[str | None, str]:
        if s.checkpoint:
            return s.checkpoint, os.path.abspath(s.checkpoint)
        if s.hub_repo and s.hub_file:
            return hub_file(s.hub_repo, s.hub_file, model_name=name, arch=arch), (
                f"hf-hub:{s.hub_repo}/{s.hub_file}"
            )
        if s.open_clip_tag:
            import open_clip

            cfg = open_clip.get_pretrained_cfg(arch, s.open_clip_tag)
            hub = (cfg or {}).get("hf_hub", "")
            if not hub:
                raise ModelUnavailableError(f"open_clip has no hub source for {arch}/{s.open_clip_tag}")
            parts = hub.rstrip("/").split("/")
            repo = "/".join(parts[:2])
            fname = "/".join(parts[2:]) or "open_clip_pytorch_model.bin"
            return hub_file(repo, fname, model_name=name, arch=arch), f"open_clip:{arch}/{s.open_clip_tag}"
        if s.random_seed is not None:
            return None, f"random-init:seed={s.random_seed}"
        raise ModelUnavailableError(
            f"no weights given for {arch!r}: pass --checkpoint FILE (a local open_clip state dict)"
        )

    def _pick_precision(self, precision: str) -> str:
        cuda = self.device.type == "cuda"
        if precision == "auto":
            if not cuda:
                return "fp32"
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        allowed = ("fp32", "bf16", "fp16") if cuda else CPU_PRECISIONS
        if precision not in allowed:
            raise InvalidArgumentError(
                f"precision {precision!r} is not available on {self.device.type}; choose auto or "
                f"one of {', '.join(allowed)}")
        return precision

    def _image_model(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What embeds images: open_clip's ``encode_image`` on CUDA (under autocast), an
        :class:`~.inference.InferenceTower` of the visual tower on CPU."""
        import open_clip

        if self.device.type == "cuda":
            return self.model.encode_image
        if type(self.model) in (open_clip.CLIP, open_clip.CustomTextCLIP):  # image = visual(x)
            return InferenceTower(self.model.visual, self.precision)
        if self.precision != "fp32":  # CoCa and others: their own encode_image
            raise InvalidArgumentError(f"{type(self.model).__name__} models run in fp32 on CPU "
                                       f"only, not {self.precision}")
        return self.model.encode_image

    def _autocast(self) -> Any:
        if self.device.type == "cuda" and self.precision in ("bf16", "fp16"):
            dt = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dt)
        return nullcontext()

    def _probe_dim(self) -> int:
        with torch.no_grad():
            return int(self.model.encode_text(self.tokenizer(["x"]).to(self.device)).shape[-1])

    @property
    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        return self._preprocess

    @torch.no_grad()
    def encode_preprocessed(self, batch: torch.Tensor) -> np.ndarray:
        with self._autocast():
            f = self.image_model(batch.to(self.device, non_blocking=True))
        f = torch.nn.functional.normalize(f.float(), dim=-1)
        return f.cpu().numpy().astype(np.float32, copy=False)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of texts, through the persistent per-model cache of :mod:`.text_cache`."""
        texts = [str(t) for t in texts]
        if self.text_cache is None:
            return self.embed_texts(texts)
        return self.text_cache.encode(texts, self.embed_texts)

    def warm_up(self) -> None:
        self.embed_texts(["warm-up"])
        super().warm_up()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Run the text tower (no cache)."""
        texts = list(texts)
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(texts[i : i + self.batch_size]).to(self.device)
            with self._autocast():
                f = self.model.encode_text(tok)
            out.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)
