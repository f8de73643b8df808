"""DiLoCo (Douillard et al. 2023, arXiv 2311.08105): H inner steps per rank, then one outer step.

Does: keeps the outer (global) parameters, a copy of every flat parameter buffer taken at the
start and after each outer step. ``after_step(step, timer)``: when ``step`` is a multiple of H,
every rank forms its pseudo-gradient (outer minus local parameters), averages it over the ranks
with mpilm's collectives, through the compressor when one is given (fp16/bf16, or top-k with
error feedback: what a rank did not send stays in its residual for the next outer step), hands
it to the outer optimizer (SGD with momentum, Nesterov by default: the paper's lr 0.7, momentum
0.9) and copies the new outer parameters into the model. The inner optimizer (AdamW by default)
keeps its state across outer steps, as in the paper. SYNC at each boundary: blocks on every rank;
the exchange counts as ``comm``.

Does not: overlap the exchange with the next inner steps (streaming DiLoCo); shard anything.

Limits: ranks hold different parameters between boundaries, so a checkpoint resumes at the same
world size only. With H = 1, outer lr 1 and no momentum it equals local SGD with H = 1 up to
rounding (outer - avg(outer - local) vs avg(local)).
"""

from __future__ import annotations

import time

import torch
from mpi4py import MPI

from mpilm.comm import collectives

PSEUDO_GRADIENT_KEY = 1 << 20  # the compressor's per-buffer key space: clear of the gradient buckets' indices


class DiLoCo:
    name = "diloco"

    def __init__(self, grads, comm: MPI.Comm, algorithm: str, every: int, outer_lr: float, outer_momentum: float,
                 nesterov: bool, compressor=None):
        self.grads, self.comm, self.algorithm, self.every = grads, comm, algorithm, every
        self.compressor = compressor
        self.outer = [torch.nn.Parameter(flat.detach().clone(), requires_grad=False)
                      for flat in grads.flat_params.values()]
        self.outer_optimizer = torch.optim.SGD(self.outer, lr=outer_lr, momentum=outer_momentum,
                                               nesterov=nesterov and outer_momentum > 0)
        self.outer_steps = 0

    def describe(self) -> str:
        group = self.outer_optimizer.param_groups[0]
        wire = self.compressor.describe() if self.compressor is not None else "uncompressed"
        return (f"DiLoCo: {self.every} inner step(s) per rank, then the averaged pseudo-gradient ({wire}, "
                f"{self.algorithm}) feeds outer SGD lr {group['lr']:g}, momentum {group['momentum']:g}"
                f"{', Nesterov' if group['nesterov'] else ''}")

    def after_step(self, step: int, timer) -> None:
        if step % self.every:
            return
        t0 = time.perf_counter()
        with timer.phase("comm"):
            self.exchange(step)
        timer.add("comm_total", time.perf_counter() - t0)

    def exchange(self, step: int) -> None:
        """SYNC: average the pseudo-gradients over every rank, take the outer step, restart from it."""
        with torch.no_grad():
            for i, (outer, flat) in enumerate(zip(self.outer, self.grads.flat_params.values())):
                pseudo = outer.detach() - flat
                if self.compressor is not None:
                    self.compressor.allreduce_(pseudo, PSEUDO_GRADIENT_KEY + i, self.comm, self.algorithm, self.outer_steps)
                else:
                    collectives.allreduce(pseudo, self.comm, self.algorithm, "avg")
                outer.grad = pseudo
            self.outer_optimizer.step()
            for outer, flat in zip(self.outer, self.grads.flat_params.values()):
                outer.grad = None
                flat.copy_(outer.detach())
        self.outer_steps += 1

    def state_dict(self) -> dict:
        return {"outer": [p.detach().clone() for p in self.outer],
                "outer_optimizer": self.outer_optimizer.state_dict(), "outer_steps": self.outer_steps,
                "compressor": self.compressor.state_dict() if self.compressor is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for p, saved in zip(self.outer, state["outer"]):
                p.copy_(saved)
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self.outer_steps = int(state["outer_steps"])
        if self.compressor is not None:
            self.compressor.load_state_dict(state["compressor"])
