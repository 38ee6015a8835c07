"""Image towers set up for fast inference on CPU, without changing open_clip's own model.

Three precisions of the image tower (the text tower is never touched):

* ``fp32`` (the CPU default): each self-attention of the vision transformer runs as one fused
  ``qkv`` linear layer plus ``scaled_dot_product_attention``, sharing the model's weights (no
  copy). Same arithmetic up to float rounding (embeddings within ~1e-5 of open_clip's).
* ``bf16``: a bfloat16 copy of the tower (AVX-512 BF16 / AMX matmuls on recent x86 CPUs).
  Lossy: opt-in.
* ``int8``: every linear layer (attention and MLP) dynamically quantized to int8 weights with
  per-batch int8 activations (fbgemm; AVX-512 VNNI where the CPU has it). Lossy: opt-in;
  ``benchmarks/encode_throughput.py --precision int8`` prints its top-10 agreement with fp32.

open_clip's ``nn.MultiheadAttention`` keeps ``in_proj`` as a bare parameter and its
``out_proj`` is a ``NonDynamicallyQuantizableLinear``, so quantizing the stock model reaches
only the MLPs; rewriting attention as two ``nn.Linear`` layers first lets int8 reach every
matmul of the transformer, which is what makes it worth it.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError

CPU_PRECISIONS = ("fp32", "bf16", "int8")


class FusedSelfAttention(nn.Module):
    """Drop-in for a self-attention ``nn.MultiheadAttention`` (same call and return shape) as
    ``qkv`` and ``out`` linear layers around ``scaled_dot_product_attention``."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        d = mha.embed_dim
        self.heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.qkv = nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None)
        self.out = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        # the model's own parameters, not copies: the fp32 tower costs no memory
        self.qkv.weight = mha.in_proj_weight
        self.out.weight = mha.out_proj.weight
        if mha.in_proj_bias is not None:
            self.qkv.bias = mha.in_proj_bias
        if mha.out_proj.bias is not None:
            self.out.bias = mha.out_proj.bias

    def forward(self, q: torch.Tensor, k: Any = None, v: Any = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, **_: Any) -> tuple[torch.Tensor, None]:
        x = q if self.batch_first else q.transpose(0, 1)
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(qkv.dtype)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        o = self.out(o.transpose(1, 2).reshape(b, n, d))
        return (o if self.batch_first else o.transpose(0, 1)), None


def _fusable(m: nn.Module) -> bool:
    return (isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim
            and m.in_proj_weight is not None and m.dropout == 0.0)


def fuse_attention(tower: nn.Module) -> nn.Module:
    """A copy of ``tower``'s module tree (sharing every parameter and buffer) whose
    self-attention blocks are :class:`FusedSelfAttention`; ``tower`` itself is unchanged.
    Only attributes named ``attn`` (open_clip's residual blocks call them with q = k = v)
    are replaced; cross-attention and attentional poolers stay as they are."""
    memo: dict[int, Any] = {id(t): t for t in (*tower.parameters(), *tower.buffers())}
    fast = copy.deepcopy(tower, memo)
    for m in fast.modules():
        attn = getattr(m, "attn", None)
        if attn is not None and _fusable(attn) and not hasattr(m, "ln_1_kv"):
            m.attn = FusedSelfAttention(attn)
    return fast.eval()


def quantize_int8(tower: nn.Module) -> nn.Module:
    """A copy of ``tower`` with every ``nn.Linear`` it calls as a module dynamically quantized
    to int8 (linear layers whose parent reads their ``weight`` directly, as open_clip's
    ``AttentionPool2d`` does, stay fp32)."""
    engines = torch.backends.quantized.supported_engines
    engine = "x86" if "x86" in engines else "fbgemm" if "fbgemm" in engines else None
    if engine is None:
        raise InvalidArgumentError(
            f"int8 inference needs PyTorch's x86/fbgemm quantized engine, which this build "
            f"lacks (it has {engines}); use --precision fp32")
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore")
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        spec = {f"{parent}.{name}".lstrip("."): default_dynamic_qconfig
                for parent, p in tower.named_modules() if not _reads_weights(p)
                for name, c in p.named_children() if type(c) is nn.Linear}
        return quantize_dynamic(tower, spec, dtype=torch.qint8, inplace=False)


def _reads_weights(m: nn.Module) -> bool:
    """Modules that pass their children's weights to a functional op (open_clip's
    ``AttentionPool2d``: ``q_proj.weight`` into ``multi_head_attention_forward``)."""
    return all(hasattr(m, k) for k in ("q_proj", "k_proj", "v_proj"))


def has_convolutions(m: nn.Module) -> bool:
    """More than a patch embedding: channels-last memory pays off (oneDNN convolutions)."""
    return sum(isinstance(c, nn.Conv2d) for c in m.modules()) > 1


class InferenceTower(nn.Module):
    """``tower`` set up for one precision; call it on fp32 inputs, get fp32 features."""

    def __init__(self, tower: nn.Module, precision: str = "fp32", fuse: bool = True) -> None:
        super().__init__()
        if precision not in CPU_PRECISIONS:
            raise InvalidArgumentError(f"CPU precision must be one of {', '.join(CPU_PRECISIONS)}, "
                                       f"got {precision!r}")
        self.precision = precision
        fast = fuse_attention(tower) if fuse else tower
        if precision == "int8":
            fast = quantize_int8(fast)
        elif precision == "bf16":
            fast = copy.deepcopy(fast).to(torch.bfloat16)
        self.channels_last = has_convolutions(fast)
        if self.channels_last:  # a layout, not a value change: same embeddings
            if precision == "fp32":  # own parameters: leave the open_clip model's layout alone
                fast = copy.deepcopy(fast)
            fast = fast.to(memory_format=torch.channels_last)
        self.tower = fast.eval()
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.tower(x).float()


def topk_agreement(reference: np.ndarray, other: np.ndarray, k: int = 10) -> float:
    """Mean share of each item's ``k`` nearest neighbours (cosine, itself excluded) under
    ``reference`` embeddings that are also among its ``k`` nearest under ``other``: how far a
    lossy precision changes image-to-image rankings (1.0: not at all)."""
    def knn(e: np.ndarray) -> np.ndarray:
        e = np.asarray(e, np.float64)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1, kind="stable")[:, :k]

    if len(reference) != len(other) or len(reference) <= k:
        raise InvalidArgumentError(f"top-{k} agreement needs two embedding sets of the same "
                                   f"length > {k}, got {len(reference)} and {len(other)}")
    a, b = knn(reference), knn(other)
    n = len(a)
    hits = (a[:, :, None] == b[:, None, :]).any(axis=2).sum()
    return float(hits / (n * k))
