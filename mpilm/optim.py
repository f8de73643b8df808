"""Optimizer construction and the learning-rate schedule.

- AdamW (default): decoupled weight decay on matrices and embeddings only (biases and norms are
  not decayed), betas (0.9, 0.95) as for GPT training; SGD with momentum as the alternative.
- Schedule: linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to
  ``lr * min_lr_ratio`` at the last step.

Not here: gradient averaging or clipping (``comm/grad_sync.py`` owns the gradient buffer).
"""

from __future__ import annotations

import math

import torch


def build(params, name: str, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
