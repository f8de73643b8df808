"""``Run``: one rank's training job, built from a ``TrainConfig``; ``step()`` is one optimizer step.

    run = build(cfg)                   # SYNC: loads the corpus, builds and broadcasts the model
    loss = run.step()                  # one optimizer step (grad accumulation, sync, clip, update)
    val = run.evaluate()               # SYNC: validation loss averaged over the ranks
    state = run.state_dict()           # everything this rank needs to continue bit-exactly
    run.load_state_dict(state)         # ... into a freshly built Run
    run.close()                        # stops the communication thread

What it does: wires the parts (data, model, ``GradBuffer`` with its reducer and communication
thread, optimizer or ``Zero1``, ``PhaseTimer``, tracer) and runs one step with every phase timed:
data | forward | backward | comm (exposed: what this thread waited for) | compress (exposed, only
without overlap: with overlap it runs on the communication thread) | optimizer, plus
``comm_total`` / ``compress_total`` (all of it, wherever it ran) and per-bucket totals.

The state (torchtitan's Stateful pattern): model, optimizer (this rank's ZeRO-1 shard under
``--zero 1``), compressor state (top-k residuals differ per rank), the step (the sampler's
position: batches are a function of (seed, rank, step, micro-step)) and the torch RNG.

Does not: print, log, evaluate on a schedule, write files (``train.py``); checkpoint files
(``checkpoint.py``).

Limits: ``state_dict`` is this rank's; resuming needs the same world size and configuration.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from mpi4py import MPI

import mpilm
from mpilm import config, data, models, modes, optim
from mpilm.comm import collectives, compress, world
from mpilm.comm.compress import BucketTiming
from mpilm.comm.grad_sync import GradBuffer, broadcast_
from mpilm.errors import UsageError
from mpilm.timing import PhaseTimer
from mpilm.trace import Tracer


@dataclass
class BucketStats:
    """Per bucket, summed over the steps timed: reduction time and the part the main thread waited."""

    total_s: list[float]
    exposed_s: list[float]
    steps: int = 0

    def add(self, timings: list[BucketTiming]) -> None:
        for t in timings:
            self.total_s[t.bucket] += t.total_s
            self.exposed_s[t.bucket] += t.exposed_s
        self.steps += 1


@dataclass
class Run:
    cfg: config.TrainConfig
    comm: MPI.Comm  # the main thread's communicator (data, eval, logging)
    grad_comm: MPI.Comm  # the gradient collectives' own duplicate: the communication thread's
    device: torch.device
    corpus: data.Corpus
    model: torch.nn.Module
    forward_model: torch.nn.Module  # what step() calls: the model, or a wrapper (bench ddp's DDP)
    grads: GradBuffer
    reducer: compress.Compressor | None
    optimizer: object  # torch.optim.Optimizer or optim.Zero1
    timer: PhaseTimer
    tracer: Tracer | None
    autocast: object = None
    step_index: int = 0
    losses: list = field(default_factory=list)  # this rank's loss per step (tensors: no device sync)
    buckets: BucketStats | None = None
    overlap_reason: str = ""  # what decide_overlap chose and why, for the banner
    watchdog: world.TimedWatchdog | None = None  # aborts the job when a wait on peers outlasts --comm-timeout
    skipped_steps: int = 0  # steps whose averaged gradient was not finite: no update
    bad_in_a_row: int = 0
    mode: object = None  # --sync async|local|diloco: the modes/ object; None: sync
    data_rank: int | None = None  # whose batches step() draws: this rank's (None), or another's (equivalence tests)

    # ---------------------------------------------------------------- one step
    def step(self) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches; returns this rank's mean loss."""
        cfg, timer, step = self.cfg, self.timer, self.step_index
        timer.begin_step(step)
        total = self.compute_gradients(step)
        finite = self.apply_gradients(optim.lr_at(step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio))
        self._count_bad(finite, step)
        if self.mode is not None:
            self.mode.after_step(step + 1, timer)  # SYNC at every --local-steps boundary
        if cfg.zero and finite:
            with timer.phase("comm"), self.watched(f"the ZeRO-1 allgather of the parameters in step {step}"):
                seconds = self.optimizer.gather()  # SYNC: every rank's updated shard reaches every rank
            timer.add("comm_total", seconds)
        timer.end_step()
        self.losses.append(total)
        self.step_index += 1
        return total

    def compute_gradients(self, step: int) -> torch.Tensor:
        """Forward and backward over ``grad_accum`` micro-batches of step ``step`` into the flat
        gradient buffer, averaged over the ranks by the reducer (none in local and async modes);
        returns this rank's mean loss (a tensor: no device sync)."""
        cfg, timer, grads = self.cfg, self.timer, self.grads
        with timer.phase("optimizer"):  # zeroing is the optimizer's bookkeeping
            grads.begin_step(step)
            total = torch.zeros((), device=self.device)
        t_compute = time.perf_counter()
        for micro in range(cfg.grad_accum):
            grads.arm(final=micro == cfg.grad_accum - 1)  # earlier micro-steps only accumulate (no_sync)
            with timer.phase("data"):
                x, y = data.sample_batch(self.corpus.block, cfg.batch_size, cfg.block_size, cfg.seed,
                                         self.comm.Get_rank() if self.data_rank is None else self.data_rank,
                                         step, micro)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with timer.phase("forward"), (self.autocast or contextlib.nullcontext()):
                _, loss = self.forward_model(x, y)
                loss = loss / cfg.grad_accum  # the mean over all micro-batches: accumulation == a bigger batch
            with timer.phase("backward"):  # with overlap, buckets are reduced on the comm thread meanwhile
                loss.backward()
                total += loss.detach()
        if self.comm.Get_rank() == cfg.slow_rank:  # --slow-rank: a straggler, for experiments
            with timer.phase("backward"):
                time.sleep((cfg.slow_factor - 1) * (time.perf_counter() - t_compute))  # host time, also on CUDA
        with timer.phase("comm"):
            timings = grads.wait()  # SYNC: every bucket is averaged over every rank
        self._credit(timings)
        return total

    def apply_gradients(self, lr: float, norm: torch.Tensor | None = None) -> bool:
        """Clip the flat gradients and take the optimizer step at ``lr`` (ZeRO-1: this rank's shard
        only); returns False, with no update, when the gradient's norm is not finite.

        ``norm``: the whole gradient's norm as the async worker that computed it measured it; an
        async server clips its slice by it and steps its slice."""
        cfg, grads = self.cfg, self.grads
        optim.set_lr(self.optimizer, lr)
        with self.timer.phase("optimizer"):
            if norm is not None:
                norm = optim.clip_(self.optimizer.shard_grads, optim.clip_limit(self.optimizer, cfg.grad_clip), norm=norm)
            elif cfg.zero:
                norm = optim.clip_(self.optimizer.shard_grads, cfg.grad_clip, self.comm)  # SYNC: the global norm
            else:
                norm = optim.clip_(list(grads.flat.values()), optim.clip_limit(self.optimizer, cfg.grad_clip))
            # sync: the norm of the *averaged* gradient, the same on every rank, so every rank skips
            # alike (one device sync per step on CUDA)
            finite = bool(torch.isfinite(norm))
            if finite:
                self.optimizer.inner_step() if cfg.zero else self.optimizer.step()
        return finite

    def _count_bad(self, finite: bool, step: int) -> None:
        """Skipped steps: counted; ``--max-bad-steps`` of them in a row stop the run (every rank alike)."""
        if finite:
            self.bad_in_a_row = 0
            return
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        if self.comm.Get_rank() == 0:
            print(f"warning: step {step + 1}: the averaged gradient's norm is not finite; the update is skipped "
                  f"({self.bad_in_a_row} in a row)", file=sys.stderr, flush=True)
        if self.bad_in_a_row >= self.cfg.max_bad_steps:
            # sync: the averaged norm, so every rank stops alike; local modes: this rank's own norm
            raise UsageError(collective=self.mode is None, message=f"{self.bad_in_a_row} steps in a row (the last: step {step + 1}) had a non-finite gradient "
                             f"norm (--max-bad-steps {self.cfg.max_bad_steps}): lower --lr, raise --warmup-steps, or "
                             "check the data")

    def _credit(self, timings: list[BucketTiming]) -> None:
        if not timings:
            return
        compress_s = sum(t.compress_s for t in timings)
        self.timer.add("comm_total", sum(t.total_s for t in timings))
        self.timer.add("compress_total", compress_s)
        if not self.grads.overlap:  # the reducers' arithmetic ran here, inside the comm phase
            self.timer.move(compress_s, "comm", "compress")
        if self.buckets is None:
            self.buckets = BucketStats([0.0] * len(self.grads.buckets), [0.0] * len(self.grads.buckets))
        if self.step_index > 0:  # the first step pays one-off set-up; left out as in the phase summary
            self.buckets.add(timings)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, alone: bool = False) -> float:
        """Mean loss over fixed validation windows, shared out over the ranks. SYNC (allreduce).

        ``alone``: this rank evaluates every window by itself, no communication (the async
        parameter server, whose workers are busy)."""
        cfg, comm = self.cfg, self.comm
        self.model.eval()
        starts = data.eval_starts(self.corpus.val.numel(), cfg.block_size, cfg.eval_batches * cfg.batch_size, cfg.seed)
        mine = starts if alone else starts[comm.Get_rank()::comm.Get_size()]
        sums = np.zeros(2)  # [sum of token losses, number of windows]
        for chunk in mine.split(cfg.batch_size):
            x, y = data.windows(self.corpus.val, chunk, cfg.block_size)
            with self.autocast or contextlib.nullcontext():
                _, loss = self.model(x.to(self.device), y.to(self.device))
            sums += (loss.item() * len(chunk), len(chunk))
        if not alone:
            with self.watched(f"the evaluation's Allreduce after step {self.step_index}"):
                comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)  # SYNC
        self.model.train()
        return float(sums[0] / sums[1])

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """This rank's state: enough for a freshly built Run to continue bit-exactly."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "step": self.step_index,
            "skipped_steps": self.skipped_steps,
            "bad_in_a_row": self.bad_in_a_row,
            "world_size": self.comm.Get_size(),
            "rank": self.comm.Get_rank(),
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": _cloned(self.optimizer.state_dict()),
            "compressor": _cloned(self.reducer.state_dict()) if self.reducer is not None else {},
            "mode": _cloned(self.mode.state_dict()) if self.mode is not None else {},
            "rng": rng,
        }

    def resize_problem(self, state: dict) -> str | None:
        """Why ``state``, written at another world size, cannot continue on this job's ranks (None: it can).

        Synchronous training keeps the same model and optimizer state on every rank, so any rank's
        copy continues at any world size (only the data order changes: each rank's block moves).
        State that differs per rank cannot be shared out again: ZeRO-1's optimizer shards and a
        compressor's error-feedback residuals.
        """
        if self.cfg.zero:
            return "its optimizer state is sharded over those ranks (--zero 1)"
        if self.mode is not None:
            return f"every rank holds its own parameters between exchanges (--sync {self.cfg.sync})"
        if state.get("compressor"):
            return f"every rank holds its own error-feedback residuals (--compress {self.cfg.compress})"
        return None

    def load_state_dict(self, state: dict) -> None:
        n_ranks, rank = self.comm.Get_size(), self.comm.Get_rank()
        if state["world_size"] != n_ranks:
            problem = self.resize_problem(state)
            if problem:
                raise UsageError(f"the checkpoint was written by {state['world_size']} ranks and this job has {n_ranks}, "
                                 f"but {problem}: resume with {state['world_size']} ranks")
        elif state["rank"] != rank:
            raise UsageError(f"state of rank {state['rank']} cannot resume rank {rank}")
        with torch.no_grad():
            self.model.load_state_dict(state["model"])  # copies in place: the flat-buffer views stay
        self.optimizer.load_state_dict(state["optimizer"])
        if self.reducer is not None:
            self.reducer.load_state_dict(state["compressor"])
        if self.mode is not None:
            self.mode.load_state_dict(state["mode"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step_index = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))

    def watched(self, what: str):
        """A context manager putting a wait on peers under the stall watchdog (a no-op at one rank)."""
        return self.watchdog.waiting(what) if self.watchdog is not None else contextlib.nullcontext()

    def optimizer_state_bytes(self) -> int:
        return optim.state_bytes(self.optimizer)  # Zero1 exposes its shard's state as .state

    def close(self) -> None:
        """Stop the communication thread (idempotent); the communicators go with the process."""
        self.grads.close()


def _cloned(state):
    """A deep copy of a state dict's tensors (the live ones keep changing as training goes on)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _cloned(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_cloned(v) for v in state]
    return state


def build(cfg: config.TrainConfig, comm: MPI.Comm | None = None, *, corpus: data.Corpus | None = None,
          wrap=None, reducer: str | None = "config") -> Run:
    """A Run on every rank of ``comm`` (collective: call on all ranks with the same config).

    ``corpus``: an already loaded corpus (bench ddp builds several Runs over one). ``wrap(model)``
    returns the module ``step()`` calls (bench ddp: the DDP wrapper). ``reducer=None``: the
    gradients are averaged elsewhere (DDP's hooks) and ``GradBuffer.wait()`` only checks.
    """
    comm = comm or world.WORLD
    n_ranks = comm.Get_size()
    check_consistent({**cfg.to_dict(), "mpilm version": mpilm.__version__, "torch version": torch.__version__},
                     comm, "configuration")  # SYNC: before anything could go wrong in a subtler way
    device = world.pick_device(cfg.device)
    watchdog = world.watchdog(cfg.comm_timeout) if n_ranks > 1 else None
    if cfg.allreduce == "shm" and world.local_size() != n_ranks:  # the same verdict on every rank
        raise UsageError(f"--allreduce shm: the job spans several nodes ({world.local_size()} of {n_ranks} ranks "
                         "on this one); shm works within one node, use --allreduce hier")
    if corpus is None:
        corpus = data.load(comm, cfg.data, cfg.cache_dir, cfg.val_fraction, cfg.block_size, cfg.data_io)  # SYNC
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, vocab_size=corpus.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_embd=cfg.n_embd, block_size=cfg.block_size, dropout=cfg.dropout).to(device)
    check_consistent({f"parameter {n}": (tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()},
                     comm, "model structure")  # SYNC: a mismatch would garble the broadcast below
    broadcast_([*model.parameters(), *model.buffers()], comm)  # SYNC: everyone starts from rank 0's weights
    grad_comm = comm.Dup()  # collective: the communication thread's own communicator
    collectives.prepare(grad_comm)  # collective first-use set-up, before the comm thread may run
    compressor = None
    if cfg.sync == "async" and n_ranks < 2:
        raise UsageError("--sync async needs at least 2 ranks (rank 0 serves the parameters, the others compute): "
                         "launch with mpirun -np 2 or more")
    if cfg.sync == "async" and cfg.ps_ranks >= n_ranks:
        raise UsageError(f"--ps-ranks {cfg.ps_ranks} with {n_ranks} ranks leaves no worker: at most {n_ranks - 1} "
                         f"servers, or launch more ranks")
    if reducer == "config" and cfg.sync in ("local", "async"):
        reducer = None  # no gradient exchange: the mode averages parameters every --local-steps
    if reducer == "config":
        # topk builds or loads the C++ kernels here, not in step 1
        compressor = compress.make_compressor(
            cfg.compress, topk_ratio=cfg.topk_ratio, error_feedback=cfg.error_feedback,
            aggregate=cfg.topk_aggregate, momentum_correction=cfg.momentum_correction, momentum=cfg.momentum,
            local_clip=cfg.local_clip, sign_chunk=cfg.sign_chunk,  # and AdamW's part (density warm-up, moments):
            **optim.compressor_options(cfg.compress, cfg.adam_variant_in_effect, cfg.topk_adam_warmup,
                                       cfg.topk_warmup_steps, sign_sqrt_ranks=cfg.sign_sqrt_ranks)
        ).bind(grad_comm, cfg.allreduce)
    # gradients in node shared memory when an algorithm may read peers' memory directly
    grads = GradBuffer(model.named_parameters(), cfg.bucket_mb * 2**20, grad_comm, device,
                       shared_memory=cfg.allreduce in ("shm", "hier", "auto"),
                       reducer=compressor if cfg.sync == "sync" else None,  # local/diloco: no per-step exchange
                       shard=cfg.zero == 1,
                       poll_s=cfg.comm_poll_us * 1e-6 if cfg.comm_poll_us > 0 else None,
                       priority_levels=cfg.comm_priority, watchdog=watchdog)  # SYNC: map check
    overlap, why = decide_overlap(cfg, grads, grad_comm, device)  # collective: auto may look at the node layout
    if overlap:
        if n_ranks > 1:
            world.require_thread_level(MPI.THREAD_MULTIPLE, "--overlap reduces gradients on a communication thread "
                                                            "while the main thread may run its own collectives")
        grads.start_overlap()
    # with DGC momentum correction the compressor applies the momentum: SGD must not apply it twice
    momentum = 0.0 if cfg.momentum_correction else cfg.momentum
    if cfg.zero:
        optimizer = optim.Zero1(grads, cfg.optimizer, cfg.lr, cfg.weight_decay, momentum, grad_comm, cfg.allreduce)
    elif cfg.sync == "async":  # each server: the optimizer of its slice; a worker: none (no state)
        optimizer = optim.SliceOptimizer(grads, modes.server_slices(grads, cfg.ps_ranks, comm.Get_rank()),
                                         cfg.optimizer, cfg.lr, cfg.weight_decay, momentum)
    else:
        optimizer = optim.build(model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay, momentum,
                                topk_adam=cfg.adam_variant_in_effect, freeze_step=cfg.topk_adam_warmup)
    mode = modes.make(cfg, grads, grad_comm, optimizer, compressor)
    tracer = Tracer(comm.Get_rank(), cfg.trace_steps) if cfg.trace else None
    timer = PhaseTimer(device, traffic=world.traffic, tracer=tracer)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    forward_model = wrap(model) if wrap is not None else model
    # the Run's reducer is the per-step gradient exchange's; diloco's compressor belongs to its mode
    return Run(cfg, comm, grad_comm, device, corpus, model, forward_model, grads,
               compressor if cfg.sync == "sync" else None, optimizer, timer,
               tracer, autocast, overlap_reason=why, watchdog=watchdog, mode=mode)


def check_consistent(fields: dict, comm: MPI.Comm, what: str) -> None:
    """Raise UsageError on every rank unless every rank has the same ``fields`` (SYNC, start-up only).

    An MPMD launch with one option different per rank would otherwise train several models
    silently, or fail later with an MPI message-size error. The gathered values are the same on
    every rank, so every rank reaches the same verdict and prints the same one-line error.
    """
    everyone = comm.allgather(fields)  # start-up only: the pickle-based allgather is fine
    names = list(dict.fromkeys(k for d in everyone for k in d))
    differ = [k for k in names if any(d.get(k, "(absent)") != everyone[0].get(k, "(absent)") for d in everyone)]
    if not differ:
        return
    parts = []
    for k in differ[:3]:
        values: dict = {}
        for r, d in enumerate(everyone):
            values.setdefault(repr(d.get(k, "(absent)")), []).append(r)
        flag = "--" + k.replace("_", "-") if k in fields and " " not in k else k
        parts.append(f"{flag} (" + "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {world.compact_cores(ranks)}: {v}"
                                              for v, ranks in values.items()) + ")")
    more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
    raise UsageError(f"ranks disagree on their {what}: {', '.join(parts)}{more}; every rank must run the same "
                     "configuration (check the launch line, e.g. an MPMD ':' section)")


def decide_overlap(cfg: config.TrainConfig, grads: GradBuffer, comm: MPI.Comm, device: torch.device) -> tuple[bool, str]:
    """``--overlap`` / ``--no-overlap`` as given; unset: on, except where there is nothing to hide.

    Nothing to hide: one rank, or every bucket reduced through node shared memory on CPU (``shm``,
    or ``auto`` choosing it for every bucket size), where the reduction is a memory copy on the
    same cores that backward uses: measured 2-3% slower with the thread than without (README).
    Collective when ``auto`` loads its rules; the verdict uses replicated values only.
    """
    if cfg.sync != "sync":
        return False, f"off (--sync {cfg.sync}: no gradient exchange during backward)"
    if grads.reducer is None:
        return False, "off (gradients averaged elsewhere)"
    if cfg.overlap is not None:
        return cfg.overlap, "on (--overlap)" if cfg.overlap else "off (--no-overlap)"
    if comm.Get_size() == 1:
        return False, "off (one rank: nothing to exchange)"
    sizes = sorted({b.nbytes for b in grads.buckets})
    runs = [a for _, a in collectives.describe_auto(sizes, comm)] if cfg.allreduce == "auto" else [cfg.allreduce]
    if device.type == "cpu" and all(a == "shm" for a in runs):
        return False, "off (one CPU node, every bucket through shared memory: nothing to hide; --overlap forces it)"
    return True, "on (communication thread)"
