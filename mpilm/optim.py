"""Optimizers, the learning-rate schedule, gradient clipping and ZeRO-1 sharding.

- AdamW (default): decoupled weight decay on matrices and embeddings only (biases and norms are
  not decayed), betas (0.9, 0.95) as for GPT training; SGD with momentum as the alternative.
- Schedule: linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to
  ``lr * min_lr_ratio`` at the last step.
- ``clip_``: scales the averaged gradients so their *global* norm is at most ``max_norm``.
- ``Zero1``: ZeRO stage 1. After the gradient buckets were reduce-scattered (rank r holds the
  average of its ``shard_bounds`` slice of every bucket), each rank steps only its slice, with
  optimizer state for that slice only, then every bucket's parameters are allgathered. A slice
  is cut further where parameters meet, so every piece keeps its parameter's weight-decay group;
  the optimizers are element-wise, so the updated values are those of the unsharded optimizer.
  Slices come from ``shard_bounds`` (sizes differ by at most one element), so any parameter
  count works with any number of ranks; the global norm for clipping sums the slices' squares
  over the ranks.

Does not: average gradients (``comm/grad_sync.py``), choose when to communicate.

Limits: ``Zero1`` steps the flat buffers of a ``GradBuffer`` (parameters must be views into its
flat parameter buffer). Its allgather runs on the caller's thread after ``GradBuffer.wait()``,
not overlapped with the next forward. The global norm under ZeRO-1 is summed in a different order
than without it, so with clipping active the two agree to rounding, not to the bit.
"""

from __future__ import annotations

import math
import time

import torch
from mpi4py import MPI

from mpilm import trace
from mpilm.comm import collectives


def build(params, name: str, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    return _from_groups([p for p in params if decays(p)], [p for p in params if not decays(p)],
                        name, lr, weight_decay, momentum)


def decays(p: torch.Tensor) -> bool:
    """Weight decay applies to matrices and embeddings, not to biases and norm gains."""
    return p.dim() >= 2


def _from_groups(decayed, plain, name, lr, weight_decay, momentum) -> torch.optim.Optimizer:
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_at(step: int, lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for 0-based ``step``."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = lr * min_lr_ratio
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_(grads: list[torch.Tensor], max_norm: float, comm: MPI.Comm | None = None) -> torch.Tensor:
    """Scale ``grads`` so their global norm is at most ``max_norm`` (0: only measure); returns the norm.

    Without ``comm`` the tensors hold the whole gradient (every rank the same). With ``comm`` each
    rank holds a disjoint part (ZeRO-1 shards): the squares are summed over the ranks. SYNC then.
    """
    if comm is None:
        norm = torch.stack([g.float().norm() for g in grads]).norm()
    else:
        square = torch.stack([g.float().pow(2).sum() for g in grads]).sum().reshape(1)
        collectives.allreduce(square, comm, "mpi", "sum")  # SYNC: every rank's shard contributes
        norm = square[0].sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return norm


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state (moments, momentum buffers, step counters) this rank holds."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


class Zero1:
    """ZeRO-1 over a ``GradBuffer``: optimizer state and update for this rank's slice of each bucket.

    ``step()`` expects the buckets reduce-scattered (``GradBuffer(shard=True)``), steps the slice,
    then allgathers every bucket's parameters (SYNC: blocks on every rank) with ``algorithm``.
    """

    def __init__(self, grads, name: str, lr: float, weight_decay: float, momentum: float, comm: MPI.Comm,
                 algorithm: str):
        self.grads, self.comm, self.algorithm = grads, comm, algorithm
        decayed, plain = [], []
        self.shard_grads: list[torch.Tensor] = []
        self.numel = 0
        for bucket in grads.buckets:
            lo, hi = grads.shard_ranges(bucket)
            flat_p, flat_g = grads.flat_params[bucket.dtype], grads.flat[bucket.dtype]
            for _, param, start, stop in grads.layout:
                a, b = max(lo, start), min(hi, stop)
                if param.dtype != bucket.dtype or a >= b:
                    continue
                piece = flat_p[a:b].detach()  # a leaf view: the update lands in the model's parameters
                piece.grad = flat_g[a:b]
                (decayed if decays(param) else plain).append(piece)
                self.shard_grads.append(piece.grad)
                self.numel += b - a
        # an empty slice (more ranks than elements in every bucket) still needs an optimizer
        self.inner = _from_groups(decayed, plain, name, lr, weight_decay, momentum) if decayed or plain else None

    @property
    def param_groups(self):
        return self.inner.param_groups if self.inner is not None else []

    def step(self) -> None:
        self.inner_step()
        self.gather()

    def inner_step(self) -> None:
        """Update this rank's slice (no communication)."""
        if self.inner is not None:
            self.inner.step()

    def gather(self) -> float:
        """Allgather every bucket's parameters; returns the seconds it took. SYNC: blocks on every rank."""
        t0 = time.perf_counter()
        for bucket in self.grads.buckets:
            with trace.traced("communication", f"allgather b{bucket.index}", bucket=bucket.index,
                              bytes=bucket.nbytes, algorithm=self.algorithm):
                collectives.allgather(bucket.params, self.comm, self.algorithm)
        return time.perf_counter() - t0

    def state_dict(self) -> dict:
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.inner is not None:
            self.inner.load_state_dict(state)

    @property
    def state(self):
        """This rank's optimizer state (of its shard only), as a torch optimizer's ``.state``."""
        return self.inner.state if self.inner is not None else {}
