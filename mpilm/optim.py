"""Optimizers, the learning-rate schedule, gradient clipping and ZeRO-1 sharding.

- AdamW (default): decoupled weight decay on matrices and embeddings only (biases and norms are
  not decayed), betas (0.9, 0.95) as for GPT training; SGD with momentum as the alternative.
- AdamW under top-k compression (``--topk-adam``; why plain AdamW suffers there: ``comm/compress.py``):
  ``topk_adam_compressor`` says what the compressor must do, ``build(..., topk_adam=)`` builds the
  optimizer that matches it: ``plain`` torch's AdamW on the sparse aggregate; ``frozen``
  ``FrozenVarianceAdamW`` (1-bit Adam, arXiv 2102.02888: AdamW while the exchange is dense, then
  the second moment frozen); ``precondition`` ``PreconditionedAdamW`` (the gradients arrive
  already divided by each rank's own sqrt(v) + eps: first moment, bias correction and decoupled
  decay only); ``precondition-momentum`` the same with the first moment in the compressor too
  (beta1 0 here). ``clip_limit`` is the clip that still makes sense for the optimizer's next step:
  none where the averaged gradient is a sparse, error-fed sum (clipping it would discard what the
  residuals owe) or already in units of the update.
- AdamW under sign compression (``--compress sign``): one way only, ``precondition-momentum``'s
  (each rank's whole Adam update goes into the compressor's error feedback; ``PreconditionedAdamW``
  with beta1 0 applies the averaged decoded sum). ``compressor_options`` gives any compressor's
  AdamW keywords: ``topk_adam_compressor``'s for top-k, that plan's for sign.
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


ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8
TOPK_ADAM = ("plain", "frozen", "precondition", "precondition-momentum")


def build(params, name: str, lr: float, weight_decay: float, momentum: float = 0.9, *,
          topk_adam: str = "plain", freeze_step: int = 0) -> torch.optim.Optimizer:
    """The optimizer ``name``; for adamw under top-k or sign, the ``topk_adam`` variant (``freeze_step``:
    frozen's)."""
    params = [p for p in params if p.requires_grad]
    return _from_groups([p for p in params if decays(p)], [p for p in params if not decays(p)],
                        name, lr, weight_decay, momentum, topk_adam, freeze_step)


def topk_adam_compressor(topk_adam: str, adam_warmup: int = 0, density_warmup: int = 0) -> dict:
    """The top-k compressor options (``compress.make_compressor`` keywords) variant ``topk_adam`` needs.

    ``adam_warmup`` (``--topk-adam-warmup``) is the variant's early phase: ``frozen``'s dense steps,
    the precondition variants' density warm-up (25% down to the target, as DGC's). ``plain`` keeps
    DGC's own ``density_warmup`` (``--topk-warmup-steps``).
    """
    adam = (ADAMW_BETAS[1], ADAMW_EPS)
    if topk_adam == "plain":
        return {"warmup_steps": density_warmup}
    if topk_adam == "frozen":
        return {"dense_steps": adam_warmup, "warmup_steps": density_warmup}
    if topk_adam == "precondition":
        return {"precondition": adam, "warmup_steps": adam_warmup}
    if topk_adam == "precondition-momentum":
        return {"precondition": adam, "first_moment": ADAMW_BETAS[0], "warmup_steps": adam_warmup}
    raise ValueError(f"unknown --topk-adam {topk_adam!r}")


SIGN_ADAM = "precondition-momentum"  # how AdamW meets --compress sign (the only way it does)


def compressor_options(compress: str, adam_variant: str, adam_warmup: int = 0, density_warmup: int = 0, *,
                       sign_sqrt_ranks: bool = True) -> dict:
    """The ``compress.make_compressor`` keywords that ``adam_variant`` (a TOPK_ADAM name, ``plain`` when
    the optimizer is not AdamW's input) needs from compressor ``compress``.

    ``topk``: ``topk_adam_compressor``'s plan. ``sign``: Adam's second and first moments in front
    (``SIGN_ADAM``; it has no density to warm up), the normalised gradient times sqrt(ranks) unless
    ``sign_sqrt_ranks`` is off; or nothing (``plain``: SGD, or --sync diloco's pseudo-gradients).
    Others take none of these options.
    """
    if compress == "sign":
        if adam_variant == SIGN_ADAM:
            return {"precondition": (ADAMW_BETAS[1], ADAMW_EPS), "first_moment": ADAMW_BETAS[0],
                    "sqrt_ranks_gain": sign_sqrt_ranks}
        if adam_variant != "plain":
            raise ValueError(f"--compress sign meets AdamW only as {SIGN_ADAM}, not {adam_variant!r}")
        return {}
    return topk_adam_compressor(adam_variant, adam_warmup, density_warmup)


def clip_limit(optimizer, max_norm: float) -> float:
    """The global-norm clip to apply before ``optimizer``'s next step: ``max_norm``, or 0 (measure only)
    where the averaged gradient is a sparse error-fed sum feeding a linear update, or is already
    normalised per coordinate (clipping would discard what the residuals owe)."""
    if isinstance(optimizer, PreconditionedAdamW):
        return 0.0
    if isinstance(optimizer, FrozenVarianceAdamW) and optimizer.frozen:
        return 0.0
    return max_norm


def decays(p: torch.Tensor) -> bool:
    """Weight decay applies to matrices and embeddings, not to biases and norm gains."""
    return p.dim() >= 2


def _from_groups(decayed, plain, name, lr, weight_decay, momentum, topk_adam="plain",
                 freeze_step=0) -> torch.optim.Optimizer:
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if name == "adamw" and topk_adam == "frozen":
        return FrozenVarianceAdamW(groups, freeze_step, lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS)
    if name == "adamw" and topk_adam in ("precondition", "precondition-momentum"):
        return PreconditionedAdamW(groups, lr=lr, beta1=ADAMW_BETAS[0] if topk_adam == "precondition" else 0.0)
    if name == "adamw" and topk_adam == "plain":
        return torch.optim.AdamW(groups, lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}")


class FrozenVarianceAdamW(torch.optim.AdamW):
    """torch's AdamW for the first ``freeze_step`` steps, then the same update with the second moment
    (and its bias correction) held at its value after step ``freeze_step`` (1-bit Adam's frozen
    variance). The first ``freeze_step`` steps are ``torch.optim.AdamW.step`` itself (bit for bit);
    afterwards the update is linear in the gradient, so error feedback's delayed sums arrive intact.

    State: torch AdamW's (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter); ``freeze_step``
    comes from the configuration, so a checkpoint resumes it through ``state_dict`` unchanged.
    Limits: no amsgrad, maximize, capturable or differentiable (the trainer uses none of them).
    """

    def __init__(self, params, freeze_step: int, **adamw):
        if freeze_step < 1:
            raise ValueError(f"FrozenVarianceAdamW: freeze_step must be >= 1, got {freeze_step}")
        super().__init__(params, **adamw)
        self.freeze_step = int(freeze_step)

    @property
    def steps_taken(self) -> int:
        for group in self.param_groups:
            for p in group["params"]:
                if "step" in self.state.get(p, {}):
                    return int(self.state[p]["step"])
        return 0

    @property
    def frozen(self) -> bool:
        """True once the second moment no longer changes (the next step is past ``freeze_step``)."""
        return self.steps_taken >= self.freeze_step

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("FrozenVarianceAdamW.step takes no closure")
        if not self.frozen:
            return super().step()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            # the second moment's bias correction stays where it was when v stopped changing
            correction2_sqrt = math.sqrt(1 - beta2 ** self.freeze_step)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] += 1
                step = float(state["step"])
                p.mul_(1 - lr * decay)
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                denom = (state["exp_avg_sq"].sqrt() / correction2_sqrt).add_(eps)
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** step))
        return None


class PreconditionedAdamW(torch.optim.Optimizer):
    """AdamW for gradients that arrive already divided by sqrt(v) + eps (``--topk-adam precondition``:
    each rank's compressor did it with its own second moment, before top-k and error feedback).

    Per parameter: m = beta1 m + (1 - beta1) g (``lerp``, as torch's AdamW), p *= 1 - lr decay,
    p -= lr m / (1 - beta1^step). With ``beta1 = 0`` (the first moment was taken before the
    compressor, ``precondition-momentum``) the update is p -= lr g and no moment is kept.
    State: ``step`` (a float tensor, as torch's AdamW) and ``exp_avg`` per parameter.
    """

    def __init__(self, params, lr: float, beta1: float = ADAMW_BETAS[0], weight_decay: float = 0.0):
        if not 0 <= beta1 < 1:
            raise ValueError(f"PreconditionedAdamW: beta1 must be in [0, 1), got {beta1}")
        super().__init__(params, {"lr": lr, "beta1": beta1, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("PreconditionedAdamW.step takes no closure")
        for group in self.param_groups:
            lr, beta1, decay = group["lr"], group["beta1"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    if beta1 > 0:
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                p.mul_(1 - lr * decay)
                if beta1 > 0:
                    state["exp_avg"].lerp_(p.grad, 1 - beta1)
                    p.add_(state["exp_avg"], alpha=-lr / (1 - beta1 ** float(state["step"])))
                else:
                    p.add_(p.grad, alpha=-lr)
        return None


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


def clip_(grads: list[torch.Tensor], max_norm: float, comm: MPI.Comm | None = None,
          norm: torch.Tensor | None = None) -> torch.Tensor:
    """Scale ``grads`` so their global norm is at most ``max_norm`` (0: only measure); returns the norm.

    Without ``comm`` the tensors hold the whole gradient (every rank the same). With ``comm`` each
    rank holds a disjoint part (ZeRO-1 shards): the squares are summed over the ranks. SYNC then.
    ``norm``: the whole gradient's norm, measured where the whole gradient was (the async worker
    that computed it, for a server's slice), so ``grads`` are scaled by it and nothing is measured.
    """
    if norm is not None:
        pass
    elif comm is None:
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


class SliceOptimizer:
    """An optimizer over slices of a ``GradBuffer``'s flat buffers: its state and its update cover
    those elements only (``ranges``: ``(dtype, lo, hi)`` into ``flat_params[dtype]``).

    The async parameter servers (``--ps-ranks``) each own one slice of every flat buffer; ``Zero1``
    owns one slice of each bucket. Does: an update lands in the model's parameters (the slices are
    views of them), weight decay by each element's parameter as in ``build``. Does not: communicate
    (``step`` is the local update). With no elements (a rank that owns nothing, or a worker) it
    holds no state and steps nothing.
    """

    def __init__(self, grads, ranges: list[tuple[torch.dtype, int, int]], name: str, lr: float, weight_decay: float,
                 momentum: float):
        self.grads = grads
        decayed, plain = [], []
        self.shard_grads: list[torch.Tensor] = []
        self.numel = 0
        for dtype, lo, hi in ranges:
            flat_p, flat_g = grads.flat_params[dtype], grads.flat[dtype]
            for _, param, start, stop in grads.layout:
                a, b = max(lo, start), min(hi, stop)
                if param.dtype != dtype or a >= b:
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

    def inner_step(self) -> None:
        """Update this rank's slices (no communication)."""
        if self.inner is not None:
            self.inner.step()

    def state_dict(self) -> dict:
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.inner is not None:
            self.inner.load_state_dict(state)

    @property
    def state(self):
        """This rank's optimizer state (of its slices only), as a torch optimizer's ``.state``."""
        return self.inner.state if self.inner is not None else {}


class Zero1(SliceOptimizer):
    """ZeRO-1 over a ``GradBuffer``: optimizer state and update for this rank's slice of each bucket.

    ``step()`` expects the buckets reduce-scattered (``GradBuffer(shard=True)``), steps the slice,
    then allgathers every bucket's parameters (SYNC: blocks on every rank) with ``algorithm``.
    """

    def __init__(self, grads, name: str, lr: float, weight_decay: float, momentum: float, comm: MPI.Comm,
                 algorithm: str):
        self.comm, self.algorithm = comm, algorithm
        super().__init__(grads, [(b.dtype, *grads.shard_ranges(b)) for b in grads.buckets], name, lr, weight_decay,
                         momentum)

    def step(self) -> None:
        self.inner_step()
        self.gather()

    def gather(self) -> float:
        """Allgather every bucket's parameters; returns the seconds it took. SYNC: blocks on every rank."""
        t0 = time.perf_counter()
        for bucket in self.grads.buckets:
            with trace.traced("communication", f"allgather b{bucket.index}", bucket=bucket.index,
                              bytes=bucket.nbytes, algorithm=self.algorithm):
                collectives.allgather(bucket.params, self.comm, self.algorithm)
        return time.perf_counter() - t0
