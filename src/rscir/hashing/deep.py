"""Deep metric and hash-code learning in the manner of MHCLN (Roy, Sangineto, Demir & Sebe,
IGARSS 2018): a small network maps an embedding to ``n_bits`` continuous codes ``u = tanh(f(x))``
trained with

* a **triplet loss** ``max(0, m + ‖u_a − u_p‖²/K − ‖u_a − u_n‖²/K)`` over every valid triplet of
  a mini-batch (positives share a class, or at least one label for multi-label targets; the
  mean is over the triplets that still violate the margin, "batch-all" of Hermans et al.) —
  for ±1 codes ``‖u_a − u_b‖²/K = 4·Hamming/K``, so the margin ``m`` is a Hamming fraction × 4;
* a **quantization loss** ``mean((|u| − 1)²)`` pushing the codes to ±1, so that the sign loses
  little of what the metric loss learned;
* a **bit-balance loss** ``mean_k (mean_batch u_k)²``: each bit splits the data in halves.

The sign gives the bits. Training is torch on CPU (seconds for a few thousand embeddings);
the fitted network is kept as numpy arrays (``coefs_``, ``intercepts_``), so ``transform`` needs
no torch and the estimator pickles like any scikit-learn one. Determinism: a seeded torch
generator inside ``torch.random.fork_rng`` (the caller's global RNG state is left untouched).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.utils import check_random_state

from ..errors import InvalidArgumentError
from .base import BaseHasher
from .ksh import label_matrix


class DeepMetricHasher(BaseHasher):
    """Supervised hashing network on precomputed embeddings; ``fit(X, y)`` with class labels
    or a 0/1 multi-label indicator matrix.

    ``hidden_layer_sizes``: widths of the ReLU layers before the ``n_bits`` output;
    ``margin``: triplet margin in units of ``4·Hamming/n_bits``; ``quantization`` and
    ``balance``: weights of the two code terms; ``epochs``, ``batch_size``, ``lr``,
    ``weight_decay``, ``dropout``: AdamW training with a cosine learning-rate decay;
    ``n_threads``: torch threads while fitting (restored after; None = torch's setting) — the
    batches are small, and one thread is fastest, by far on a busy machine."""

    supervised = True

    def __init__(
        self,
        n_bits: int = 64,
        *,
        hidden_layer_sizes: tuple[int, ...] = (512,),
        margin: float = 1.0,
        quantization: float = 0.1,
        balance: float = 0.1,
        epochs: int = 300,
        batch_size: int = 128,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        dropout: float = 0.2,
        n_threads: int | None = 1,
        random_state: int | None = None,
    ) -> None:
        super().__init__(n_bits, random_state=random_state)
        self.hidden_layer_sizes = hidden_layer_sizes
        self.margin = margin
        self.quantization = quantization
        self.balance = balance
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.n_threads = n_threads

    def _check_params(self) -> tuple[int, ...]:
        hidden = tuple(int(h) for h in self.hidden_layer_sizes)
        if any(h < 1 for h in hidden):
            raise InvalidArgumentError(f"hidden_layer_sizes must be positive, got {self.hidden_layer_sizes}")
        if int(self.epochs) < 1 or int(self.batch_size) < 2:
            raise InvalidArgumentError(
                f"epochs must be >= 1 and batch_size >= 2, got {self.epochs} and {self.batch_size}"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise InvalidArgumentError(f"dropout must be in [0, 1), got {self.dropout}")
        if min(float(self.margin), float(self.quantization), float(self.balance)) < 0:
            raise InvalidArgumentError("margin, quantization and balance must be non-negative")
        return hidden

    def _fit(self, X: np.ndarray, y: Any) -> None:
        import torch

        hidden = self._check_params()
        labels = label_matrix(y, X.shape[0])
        self.mean_ = X.mean(axis=0)
        self.scale_ = X.std(axis=0)
        self.scale_[self.scale_ < 1e-12] = 1.0
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        threads = torch.get_num_threads()
        try:
            if self.n_threads is not None:
                torch.set_num_threads(max(1, int(self.n_threads)))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # init and dropout; restored on exit
                net, self.n_iter_, self.loss_curve_ = _train(
                    torch.as_tensor((X - self.mean_) / self.scale_, dtype=torch.float32),
                    torch.as_tensor(labels, dtype=torch.float32),
                    hidden, self.n_bits_, self, torch.Generator().manual_seed(seed),
                )
        finally:
            torch.set_num_threads(threads)
        linear = [m for m in net if isinstance(m, torch.nn.Linear)]
        self.coefs_ = [m.weight.detach().numpy().T.astype(np.float64) for m in linear]
        self.intercepts_ = [m.bias.detach().numpy().astype(np.float64) for m in linear]

    def _project(self, X: np.ndarray) -> np.ndarray:
        h = (X - self.mean_) / self.scale_
        for i, (w, b) in enumerate(zip(self.coefs_, self.intercepts_, strict=True)):
            h = h @ w + b
            if i < len(self.coefs_) - 1:
                h = np.maximum(h, 0.0)
        return h  # tanh is monotone: its sign is this sign


def _train(
    x: Any, labels: Any, hidden: tuple[int, ...], n_bits: int, p: DeepMetricHasher, gen: Any
) -> tuple[Any, int, list[float]]:
    """The training loop: returns the network (eval mode), steps taken and per-epoch loss."""
    import torch

    layers: list[torch.nn.Module] = []
    width = x.shape[1]
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU(), torch.nn.Dropout(float(p.dropout))]
        width = h
    net = torch.nn.Sequential(*layers, torch.nn.Linear(width, n_bits))
    n = x.shape[0]
    bs = min(int(p.batch_size), n)
    steps_per_epoch = max(1, n // bs)  # full batches only: every batch has many triplets
    total = int(p.epochs) * steps_per_epoch
    opt = torch.optim.AdamW(net.parameters(), lr=float(p.lr), weight_decay=float(p.weight_decay))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    curve: list[float] = []
    net.train()
    for _ in range(int(p.epochs)):
        perm = torch.randperm(n, generator=gen)
        run = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * bs : (s + 1) * bs]
            u = torch.tanh(net(x[idx]))
            loss = (
                triplet_loss(u, labels[idx], float(p.margin))
                + float(p.quantization) * ((u.abs() - 1.0) ** 2).mean()
                + float(p.balance) * (u.mean(dim=0) ** 2).mean()
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            run += float(loss.detach())
        curve.append(run / steps_per_epoch)
    net.eval()
    return net, total, curve


def triplet_loss(u: Any, labels: Any, margin: float) -> Any:
    """Batch-all triplet loss on codes ``u`` (B, K) with label indicators (B, L): the mean of
    ``max(0, margin + d(a, p) − d(a, n))`` over the valid triplets that violate the margin,
    ``d = ‖·‖²/K``, positives sharing at least one label (0 when the batch has no triplet).
    Computed over the positive pairs only, (pairs, B) rather than the (B, B, B) cube."""
    import torch

    sq = (u * u).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2.0 * u @ u.T).clamp(min=0.0) / u.shape[1]
    sim = (labels @ labels.T) > 0
    a, p = torch.nonzero(sim & ~torch.eye(len(u), dtype=torch.bool), as_tuple=True)
    viol = torch.relu(margin + d[a, p][:, None] - d[a]) * ~sim[a]  # (pairs, B): n over batch
    active = (viol > 1e-12).sum()
    return viol.sum() / active.clamp(min=1)
