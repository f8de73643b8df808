"""Local SGD: every rank steps on its own gradients; parameters are averaged every H steps.

Does: ``after_step(step, timer)`` after optimizer step number ``step`` (1-based): when ``step``
is a multiple of H, averages each flat parameter buffer over the ranks with mpilm's collectives
(``--allreduce``), and with ``average_optimizer`` also every optimizer state tensor (moments,
momentum buffers; packed into one flat buffer per dtype, so one collective each). SYNC there:
blocks on every rank; the time counts as ``comm`` (exposed, nothing overlaps it).

Does not: compress (parameters, unlike gradients, cannot carry an error-feedback residual: use
``diloco`` for a compressed exchange); average anything between boundaries.

Limits: needs the full optimizer on every rank (not ZeRO-1). Ranks hold different parameters
between boundaries, so a checkpoint resumes at the same world size only. With H = 1 and plain
SGD the result equals synchronous SGD up to rounding (avg(p - lr g_r) vs p - lr avg(g_r)).
"""

from __future__ import annotations

import time

import torch
from mpi4py import MPI

from mpilm.comm import collectives


class LocalSGD:
    name = "local"

    def __init__(self, grads, comm: MPI.Comm, algorithm: str, every: int, optimizer, average_optimizer: bool):
        self.grads, self.comm, self.algorithm, self.every = grads, comm, algorithm, every
        self.optimizer, self.average_optimizer = optimizer, average_optimizer
        self.exchanges = 0

    def describe(self) -> str:
        return (f"local SGD: every rank steps alone, parameters{' and optimizer state' if self.average_optimizer else ''} "
                f"averaged every {self.every} step(s) ({self.algorithm})")

    def after_step(self, step: int, timer) -> None:
        if step % self.every:
            return
        t0 = time.perf_counter()
        with timer.phase("comm"):
            self.exchange()
        timer.add("comm_total", time.perf_counter() - t0)

    def exchange(self) -> None:
        """SYNC: average the parameters (and optimizer state) over every rank."""
        for flat in self.grads.flat_params.values():
            collectives.allreduce(flat, self.comm, self.algorithm, "avg")
        if self.average_optimizer:
            average_tensors(optimizer_tensors(self.optimizer), self.comm, self.algorithm)
        self.exchanges += 1

    def state_dict(self) -> dict:
        return {"exchanges": self.exchanges}

    def load_state_dict(self, state: dict) -> None:
        self.exchanges = int(state.get("exchanges", 0))


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """The floating-point state tensors of a torch optimizer (moments, momentum buffers), in a fixed
    order (parameter groups, then parameters, then keys sorted), so every rank packs them alike."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            out.extend(state[k] for k in sorted(state) if isinstance(state[k], torch.Tensor)
                       and state[k].is_floating_point() and state[k].dim() > 0)
    return out


def average_tensors(tensors: list[torch.Tensor], comm: MPI.Comm, algorithm: str) -> None:
    """SYNC: average ``tensors`` in place over ``comm``, packed into one flat buffer per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        collectives.allreduce(flat, comm, algorithm, "avg")
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
