"""How a Run's steps talk to each other: ``--sync sync|async|local|diloco``.

- ``sync`` (the default): gradients are averaged every step, bucket by bucket during backward
  (``comm/grad_sync.py``); every rank takes the same step. No object here: ``make`` returns None.
- ``async`` (``async_ps.py``): ranks 0 .. ``--ps-ranks`` - 1 are parameter servers, each holding a
  slice of the parameters; workers push gradients and pull parameters with point-to-point
  messages, never waiting for each other. It has its own loop
  (``AsyncSGD.train``) instead of ``Run.step``.
- ``local`` (``local.py``): every rank steps on its own gradients; every ``--local-steps H`` steps
  the parameters (and, with ``--local-average-optimizer``, the optimizer state) are averaged.
- ``diloco`` (``diloco.py``, arXiv 2311.08105): H inner steps per rank, then the pseudo-gradient
  (start parameters minus local parameters) is averaged, optionally compressed, and applied by an
  outer Nesterov SGD.

A mode object is built by ``Run`` and called after every optimizer step (``after_step``); it
times its own exchange as ``comm`` and owns state that ``Run.state_dict`` checkpoints. Modes use
mpilm's collectives on the Run's gradient communicator, between steps, when the communication
thread is idle. They import comm and optim, never run or train (the Run passes itself in parts).
"""

from __future__ import annotations

from mpilm.modes.async_ps import AsyncSGD, server_slices
from mpilm.modes.diloco import DiLoCo
from mpilm.modes.local import LocalSGD

MODES = ("sync", "async", "local", "diloco")


def make(cfg, grads, comm, optimizer, compressor):
    """The mode object for ``cfg.sync`` over ``grads`` (a GradBuffer) on ``comm``; None for ``sync``."""
    if cfg.sync == "local":
        return LocalSGD(grads, comm, cfg.allreduce, cfg.local_steps, optimizer, cfg.local_average_optimizer)
    if cfg.sync == "diloco":
        return DiLoCo(grads, comm, cfg.allreduce, cfg.local_steps, cfg.outer_lr, cfg.outer_momentum,
                      cfg.outer_nesterov, compressor)
    if cfg.sync == "async":
        return AsyncSGD(grads, comm, cfg.max_staleness, cfg.staleness_lr, cfg.ps_ranks, cfg.async_pipeline)
    return None
