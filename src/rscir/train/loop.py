"""Contrastive training of an image tower against a frozen text tower (locked-text tuning).

Symmetric InfoNCE with a learnable temperature. Captions sharing a positive group (identical
text, or templates of one class) are all positives for each other, so a batch with ten
"an aerial image of grass" tiles does not push them apart.

Reproducibility: the shuffling of epoch ``e`` and all randomness of step ``s`` (caption choice,
crops, rotations, dropout) come from generators seeded by ``(seed, e)`` and ``(seed, e, s)``,
and the learning rate is a function of the global step. A checkpoint therefore only needs the
weights, the optimizer state and the position ``(epoch, step)`` for a resumed run to follow the
uninterrupted one exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..encoders.towers import ImageTower, embed_cached, export_tower
from ..errors import InvalidArgumentError, ModelError
from .data import PairSet, Vocabulary
from .metrics import evaluate_embeddings

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings (everything that changes the trajectory, except the data)."""

    epochs: int = 20
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    seed: int = 0
    init_temperature: float = 0.07
    learn_temperature: bool = True
    augment: bool = True
    save_every: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        # 0 epochs: export the seeded, untrained tower (the random floor of the model card)
        if self.epochs < 0 or self.batch_size < 2:
            raise InvalidArgumentError("need at least 0 epochs and a batch size of at least 2")
        if self.lr <= 0 or not 0 < self.init_temperature < 1:
            raise InvalidArgumentError("lr must be > 0 and the initial temperature in (0, 1)")

    def trajectory_key(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("save_every", "device"):
            d.pop(k)
        return d


@dataclass
class Split:
    """One split as tensors: cached tower inputs and caption ids per image."""

    inputs: torch.Tensor
    cap_ids: np.ndarray
    cap_offsets: np.ndarray
    captions: list[list[str]]
    labels: list[str | None]

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class History:
    rows: list[dict[str, Any]] = field(default_factory=list)

    def last(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixing: nearby inputs decorrelate)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def resolve_device(device: str) -> torch.device:
    from ..encoders.openclip import resolve_device as _rd

    return _rd(device)


# ---------------------------------------------------------------------------------------------
# caching of decoded inputs and text embeddings


class _DecodeDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], inp: Any) -> None:
        self.paths, self.inp = paths, inp

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        from ..ingest.images import load_image

        pil, _ = load_image(self.paths[i])
        return np.asarray(self.inp.load(pil))


def _key(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def load_inputs(
    paths: list[str],
    inp: Any,
    cache_dir: Path | None,
    *,
    workers: int = 0,
    progress: bool = True,
    desc: str = "decode",
) -> torch.Tensor:
    """Decode every image once into what the tower's input pipeline caches (N, ...)."""
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"inputs-{_key(paths, repr(inp))}.npy"
        if cache.is_file():
            return torch.from_numpy(np.load(cache))
    out = np.zeros((len(paths), *inp.cache_shape), inp.cache_dtype)
    loader = torch.utils.data.DataLoader(
        _DecodeDataset(paths, inp), batch_size=32, num_workers=workers,
        collate_fn=lambda items: np.stack(items),
    )
    i = 0
    for chunk in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        out[i : i + len(chunk)] = chunk
        i += len(chunk)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, out)
        os.replace(tmp, cache)
    return torch.from_numpy(out)


def embed_vocabulary(
    texts: list[str], text_model: Any, cache_dir: Path | None
) -> torch.Tensor:
    """Frozen text embeddings of every distinct caption, computed once (and cached)."""
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"texts-{_key(texts, text_model.fingerprint())}.npy"
        if cache.is_file():
            return torch.from_numpy(np.load(cache))
    emb = np.asarray(text_model.encode(texts), np.float32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, emb)
        os.replace(tmp, cache)
    return torch.from_numpy(emb)


def make_split(s: PairSet, vocab: Vocabulary, inputs: torch.Tensor) -> Split:
    ids, offs = vocab.encode(s)
    return Split(inputs, ids, offs, [list(c) for c in s.captions], list(s.labels))


# ---------------------------------------------------------------------------------------------
# loss


def contrastive_loss(
    img: torch.Tensor, txt: torch.Tensor, groups: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of normalized (image, text) pairs; pairs whose captions
    share a group are positives for each other (soft targets spread over them)."""
    logits = logit_scale * img @ txt.T
    pos = (groups[:, None] == groups[None, :]).float()
    target = pos / pos.sum(dim=1, keepdim=True)
    loss_i = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(target * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_i + loss_t)


# ---------------------------------------------------------------------------------------------
# trainer


class Trainer:
    """Fits an :class:`ImageTower` to frozen text embeddings; checkpoints and resumes."""

    def __init__(
        self,
        tower: ImageTower,
        text_emb: torch.Tensor,
        group_of: np.ndarray,
        train: Split,
        config: TrainConfig,
        *,
        val: Split | None = None,
        test: Split | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        data_key: str = "",
        text_info: dict[str, str] | None = None,
        progress: bool = True,
    ) -> None:
        if len(train) < 2:
            raise InvalidArgumentError("need at least 2 training images")
        self.config = config
        self.device = resolve_device(config.device)
        self.tower = tower.to(self.device)
        # frozen text: a table of normalized embeddings; trained text (open_clip towers with
        # train_text): a table of token ids run through the tower's own text encoder each step
        self.trains_text = tower.trains_text
        if self.trains_text:
            self.text_emb = text_emb.long().to(self.device)
        else:
            self.text_emb = F.normalize(text_emb.float(), dim=-1).to(self.device)
        self.group_of = torch.as_tensor(group_of, dtype=torch.long)
        self.train_split, self.val, self.test = train, val, test
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.text_info = dict(text_info or {})
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / config.init_temperature), device=self.device),
            requires_grad=config.learn_temperature,
        )
        decay = [p for p in self.tower.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.tower.parameters() if p.requires_grad and p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if config.learn_temperature:
            groups.append({"params": [self.logit_scale], "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr)
        self.batch = min(config.batch_size, len(train))
        self.steps_per_epoch = max(1, len(train) // self.batch)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.run_key = _key(config.trajectory_key(), tower.config.to_json(), data_key)
        self.history = History()
        self._lookup: dict[str, int] | None = None
        self.epoch_losses: list[float] = []  # losses of the current epoch so far
        self.epoch = 0
        self.step = 0  # next step within self.epoch

    # -- schedule -------------------------------------------------------------------------------
    def lr_at(self, global_step: int) -> float:
        c = self.config
        warm = min(c.warmup_steps, max(1, self.total_steps // 5))
        if global_step < warm:
            return c.lr * (global_step + 1) / warm
        t = (global_step - warm) / max(1, self.total_steps - warm)
        return c.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    @property
    def temperature(self) -> float:
        return float(1.0 / self._scale().item())

    def _scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    # -- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "run_key": self.run_key,
            "epoch": self.epoch,
            "step": self.step,
            "tower": self.tower.state_dict(),
            "logit_scale": self.logit_scale.detach().cpu(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history.rows,
            "epoch_losses": list(self.epoch_losses),
            "config": asdict(self.config),
            "tower_config": self.tower.config.to_json(),
        }

    def save_checkpoint(self) -> None:
        path = self.checkpoint_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: an interruption never leaves a half-written checkpoint

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if sd.get("run_key") != self.run_key:
            raise InvalidArgumentError(
                f"checkpoint {path} belongs to another run (different data, tower or settings); "
                "use a new output folder or --no-resume to start over"
            )
        self.tower.load_state_dict(sd["tower"])
        with torch.no_grad():
            self.logit_scale.copy_(sd["logit_scale"].to(self.device))
        self.optimizer.load_state_dict(sd["optimizer"])
        self.history = History(list(sd["history"]))
        self.epoch_losses = [float(x) for x in sd.get("epoch_losses", [])]
        self.epoch, self.step = int(sd["epoch"]), int(sd["step"])

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, split: Split) -> dict[str, float]:
        emb = embed_cached(self.tower, split.inputs, self.device).numpy()
        lookup = self._text_lookup()

        def embed_texts(texts: list[str]) -> np.ndarray:
            ids = torch.tensor([lookup[t] for t in texts], dtype=torch.long)
            if not self.trains_text:
                return self.text_emb[ids.to(self.device)].cpu().numpy()
            was = self.tower.training
            self.tower.eval()
            with torch.no_grad():
                out = torch.cat([self._texts(ids[i : i + 256].to(self.device)).float().cpu()
                                 for i in range(0, len(ids), 256)])
            self.tower.train(was)
            return out.numpy()

        return evaluate_embeddings(emb, split.captions, split.labels, embed_texts)

    def _texts(self, cap: torch.Tensor) -> torch.Tensor:
        if self.trains_text:
            return F.normalize(self.tower.net.encode_text(self.text_emb[cap]), dim=-1)
        return self.text_emb[cap]

    def _text_lookup(self) -> dict[str, int]:
        if self._lookup is None:
            self._lookup = {}
            for s in (self.train_split, self.val, self.test):
                if s is None:
                    continue
                for caps, i0 in zip(s.captions, s.cap_offsets[:-1], strict=True):
                    for j, c in enumerate(caps):
                        self._lookup[c] = int(s.cap_ids[i0 + j])
        return self._lookup

    # -- training -------------------------------------------------------------------------------
    def _step_batch(self, perm: torch.Tensor, step: int, gen: torch.Generator) -> torch.Tensor:
        idx = perm[step * self.batch : (step + 1) * self.batch]
        s = self.train_split
        idx_np = idx.numpy()
        start = s.cap_offsets[idx_np]
        count = s.cap_offsets[idx_np + 1] - start
        pick = (torch.rand(len(idx_np), generator=gen, dtype=torch.float64).numpy() * count)
        cap = torch.from_numpy(s.cap_ids[start + np.minimum(pick.astype(np.int64), count - 1)])
        x = self.tower.input.batch(s.inputs[idx], train=self.config.augment, generator=gen)
        img = F.normalize(self.tower(x.to(self.device)), dim=-1)
        txt = self._texts(cap.to(self.device))
        return contrastive_loss(img, txt, self.group_of[cap].to(self.device), self._scale())

    def initial_loss(self) -> float:
        """Mean loss of the current (untrained) tower on the first epoch's batches, with the
        captions, crops and dropout that training draws for them, so it compares with the
        epochs' mean training losses. Nothing is updated: no gradient, and the normalization
        layers' running statistics are restored (training then follows the same trajectory)."""
        c = self.config
        perm = torch.randperm(
            len(self.train_split), generator=torch.Generator().manual_seed(derive_seed(c.seed, 0))
        )
        saved = {k: v.clone() for k, v in self.tower.named_buffers()}
        was = self.tower.training
        self.tower.train()
        losses = []
        with torch.no_grad():
            for step in range(self.steps_per_epoch):
                seed = derive_seed(c.seed, 0, step)
                torch.manual_seed(seed)
                gen = torch.Generator().manual_seed(seed)
                losses.append(float(self._step_batch(perm, step, gen).item()))
            for k, v in self.tower.named_buffers():
                v.copy_(saved[k])
        self.tower.train(was)
        return float(np.mean(losses))

    def fit(
        self,
        *,
        resume: bool = True,
        stop_after_steps: int | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ) -> History:
        """Train to ``config.epochs``; resumes from ``out_dir``'s checkpoint when present.
        ``stop_after_steps`` simulates an interruption (checkpoint saved, then returns).
        The caller's global RNG state is left as it was."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._fit(resume, stop_after_steps, on_epoch)

    def _fit(
        self,
        resume: bool,
        stop_after_steps: int | None,
        on_epoch: Callable[[dict[str, Any]], None] | None,
    ) -> History:
        ckpt = self.checkpoint_path
        if resume and ckpt is not None and ckpt.is_file():
            self.load_checkpoint(ckpt)
            log.info("resumed from %s at epoch %d step %d", ckpt, self.epoch, self.step)
        if not self.history.rows:
            # Row 0 is the untrained tower. Its loss used to be a NaN placeholder (no step has
            # run yet), which logged as "epoch 0 | loss nan" and wrote NaN, invalid JSON, to
            # history.json and metrics.json; it is now measured (see initial_loss).
            row = {"epoch": 0, "loss": self.initial_loss(), "temperature": self.temperature}
            if self.val is not None:
                row.update({f"val_{k}": v for k, v in self.evaluate(self.val).items()})
            if self.test is not None:
                row.update({f"test_{k}": v for k, v in self.evaluate(self.test).items()})
            self._record(row, on_epoch)
        c = self.config
        done_steps = 0
        while self.epoch < c.epochs:
            e = self.epoch
            perm = torch.randperm(
                len(self.train_split), generator=torch.Generator().manual_seed(derive_seed(c.seed, e))
            )
            self.tower.train()
            losses = self.epoch_losses
            bar = tqdm(
                total=self.steps_per_epoch, initial=self.step, desc=f"epoch {e + 1}/{c.epochs}",
                unit="step", disable=not self.progress, leave=False,
            )
            try:
                while self.step < self.steps_per_epoch:
                    g = self.epoch * self.steps_per_epoch + self.step
                    seed = derive_seed(c.seed, e, self.step)
                    torch.manual_seed(seed)  # dropout and any other global-RNG use
                    gen = torch.Generator().manual_seed(seed)
                    for grp in self.optimizer.param_groups:
                        grp["lr"] = self.lr_at(g)
                    loss = self._step_batch(perm, self.step, gen)
                    if not torch.isfinite(loss):
                        raise ModelError(
                            f"training diverged: the loss is {loss.item()} at epoch {e + 1} "
                            f"step {self.step + 1}; lower --lr (now {c.lr:g}) or raise "
                            "--temperature"
                        )
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    losses.append(float(loss.item()))
                    self.step += 1
                    done_steps += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", T=f"{self.temperature:.3f}")
                    if c.save_every and g % c.save_every == c.save_every - 1:
                        self.save_checkpoint()
                    if stop_after_steps is not None and done_steps >= stop_after_steps:
                        self.save_checkpoint()
                        return self.history
            except KeyboardInterrupt:
                self.save_checkpoint()
                raise
            finally:
                bar.close()
            row = {
                "epoch": e + 1,
                "loss": float(np.mean(losses)) if losses else float("nan"),
                "lr": self.lr_at(self.epoch * self.steps_per_epoch + self.steps_per_epoch - 1),
                "temperature": self.temperature,
            }
            if self.val is not None:
                row.update({f"val_{k}": v for k, v in self.evaluate(self.val).items()})
            if self.test is not None and e + 1 == c.epochs:
                row.update({f"test_{k}": v for k, v in self.evaluate(self.test).items()})
            self.epoch, self.step = e + 1, 0
            self.epoch_losses = []
            self._record(row, on_epoch)
            self.save_checkpoint()
        return self.history

    def _record(self, row: dict[str, Any], on_epoch: Callable[[dict[str, Any]], None] | None) -> None:
        self.history.rows.append(row)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "history.json").write_text(json.dumps(self.history.rows, indent=1))
        if on_epoch is not None:
            on_epoch(row)

    # -- export ---------------------------------------------------------------------------------
    def export(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
        """The tower's weights as safetensors, with what is needed to rebuild it as metadata."""
        meta = {
            "logit_scale": f"{float(self._scale().item()):.6f}",
            "history": json.dumps(self.history.rows[-1:] if self.history.rows else []),
            **{k: json.dumps(v) if not isinstance(v, str) else v for k, v in (extra or {}).items()},
        }
        return export_tower(self.tower, path, text=self.text_info, meta=meta)
