"""``mpirun -np N python -m mpilm.bench ddp [--algorithms mpi,ring,...] [-- TRAIN OPTIONS]``.

mpilm against ``torch.nn.parallel.DistributedDataParallel`` on the same model, data, batch,
optimizer, learning-rate schedule and steps, in the same processes. Every runner is one
``Runner`` of the shared harness below: the same seeded model broadcast from rank 0, the same
``GradBuffer`` (``param.grad`` views; it also does the clipping), the same optimizer, the same
batches (``mpilm.data.sample_batch`` by (seed, rank, step)) and the same ``mpilm.train.train_step``.
They differ only in how gradients are averaged:

- ``ddp``: the model is wrapped in DDP (gloo on CPU, nccl on CUDA), whose autograd hooks
  allreduce its own buckets *during* backward; DDP copies the averages into our ``.grad``
  views, and ``train_step``'s sync step is told the gradients are already averaged.
- ``mpilm <algorithm>``: the plain model; after backward ``GradBuffer.sync`` allreduces each
  bucket with ``mpilm.comm.collectives`` (``--algorithms``, as ``--allreduce`` in training).

The runners take turns, ``--block-steps`` steps at a time, so they share the machine's noise.
A step's time is the slowest rank's; the table shows the median after ``--warmup`` steps,
tokens/s from it, exposed comm (what the loop waited on; for DDP it is hidden inside backward
and not separable) and total comm (mpilm: the sync; DDP: the union of its bucket allreduces, from
issue to completion, timed by a comm hook equivalent to DDP's default allreduce), and the ratio
to DDP. Correctness check: each mpilm runner's first ``--check-steps`` losses (averaged over
ranks) must equal DDP's to ``--tolerance``; the command exits 1 if they do not.

Limits: fp32 on every device (no autocast) so the loss check is meaningful; ``--dropout 0`` and
``--grad-accum 1`` (DDP would allreduce every micro-step without ``no_sync``); torch.distributed
rendezvous over TCP at rank 0's address on the interface that routes to its peers, port chosen by
rank 0, both broadcast over MPI. Gloo still picks its own interface for the data by resolving
each host's name: set ``GLOO_SOCKET_IFNAME`` where a name resolves to loopback.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from mpilm import config, data, models, optim
from mpilm.comm import world
from mpilm.comm.grad_sync import GradBuffer, broadcast_
from mpilm.errors import UsageError
from mpilm.timing import PhaseTimer
from mpilm.train import train_step
from mpilm.bench import parse_algorithms, pyplot

DESCRIPTION = "mpilm vs torch DistributedDataParallel on the same model and data"

DEFAULT_ALGORITHMS = "mpi,ring,rhd,tree"
_BENCH_DEFAULTS = ["--steps", "40"]  # before the user's train options, which override them
_PLOT_PHASES = ("data", "forward", "backward", "comm", "optimizer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algorithms", default=DEFAULT_ALGORITHMS,
                        help="mpilm allreduce algorithms to run against DDP, comma-separated (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps of each runner left out of timing (default %(default)s)")
    parser.add_argument("--block-steps", type=int, default=1,
                        help="steps a runner takes per turn; 1 spreads bursts of machine load evenly (default %(default)s)")
    parser.add_argument("--check-steps", type=int, default=5, help="first steps whose losses must match DDP's (default %(default)s)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |loss difference| in the check (default %(default)s)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results to this JSON file")
    parser.add_argument("--plot", default=None, help="write tokens/s and step-time bars to this PNG")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN OPTIONS",
                        help="mpilm.train options (model, batch, optimizer, --steps ...), after --; default --steps 40")


# ---------------------------------------------------------------- the shared harness
@dataclass
class Runner:
    """One training job inside this process: what it trains, how it averages, what it measured."""

    name: str
    forward_model: torch.nn.Module  # what train_step calls: the DDP wrapper or the plain model
    grads: GradBuffer
    optimizer: torch.optim.Optimizer
    timer: PhaseTimer
    algorithm: str = "mpi"
    reduce_bucket: object = None  # None: GradBuffer allreduces with ``algorithm``
    comm_timer: _DDPCommTimer | None = None
    losses: list = field(default_factory=list)

    @property
    def steps_done(self) -> int:
        return len(self.losses)


def build_model(cfg: config.TrainConfig, comm: MPI.Comm, device: torch.device, vocab_size: int):
    """The seeded model, made identical on every rank (SYNC: broadcast from rank 0)."""
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                         block_size=cfg.block_size, dropout=cfg.dropout).to(device)
    broadcast_([*model.parameters(), *model.buffers()], comm)
    return model


def make_runner(name: str, cfg: config.TrainConfig, comm: MPI.Comm, device: torch.device, vocab_size: int, *,
                algorithm: str = "mpi", ddp: bool = False) -> Runner:
    model = build_model(cfg, comm, device, vocab_size)
    grads = GradBuffer(model.named_parameters(), cfg.bucket_mb * 2**20, comm, device)  # SYNC: map check
    optimizer = optim.build(model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    timer = PhaseTimer(device, traffic=world.traffic)
    if not ddp:
        return Runner(name, model, grads, optimizer, timer, algorithm=algorithm)
    # DDP copies its averaged buckets into the existing .grad tensors, which are our views
    wrapped = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=cfg.bucket_mb)
    comm_timer = _DDPCommTimer()
    wrapped.register_comm_hook(comm_timer, _timed_allreduce_hook)
    return Runner(name, wrapped, grads, optimizer, timer, reduce_bucket=_already_averaged_by_ddp, comm_timer=comm_timer)


def _already_averaged_by_ddp(view: torch.Tensor, index: int) -> None:
    """GradBuffer.sync's per-bucket step for DDP: nothing to do, backward already averaged."""


def run_steps(runner: Runner, cfg: config.TrainConfig, corpus: data.Corpus, device: torch.device, count: int) -> None:
    """``count`` more training steps of ``runner``: the schedule and batches depend only on the step."""
    rank = world.rank()
    for _ in range(count):
        step = runner.steps_done

        def get_batch(micro, step=step):
            x, y = data.sample_batch(corpus.block, cfg.batch_size, cfg.block_size, cfg.seed, rank, step, micro)
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        optim.set_lr(runner.optimizer, optim.lr_at(step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio))
        runner.timer.begin_step(step)
        loss = train_step(runner.forward_model, runner.grads, runner.optimizer, get_batch, 1, runner.timer,
                          algorithm=runner.algorithm, grad_clip=cfg.grad_clip, reduce_bucket=runner.reduce_bucket)
        if runner.comm_timer is not None:
            runner.timer.add("comm_total", runner.comm_timer.take())
        runner.timer.end_step()
        runner.losses.append(loss)


# ---------------------------------------------------------------- DDP: rendezvous and comm timing
class _DDPCommTimer:
    """Issue/completion times of DDP's bucket allreduces; ``take`` returns their union (seconds)."""

    def __init__(self):
        self.intervals: list[list[float]] = []

    def take(self) -> float:
        spans = sorted(self.intervals)
        self.intervals = []
        total, end = 0.0, float("-inf")
        for t0, t1 in spans:
            if t1 > end:
                total += t1 - max(t0, end)
                end = t1
        return total


def _timed_allreduce_hook(state: _DDPCommTimer, bucket):
    """DDP's default allreduce (divide by world size, then sum), with its span recorded."""
    import torch.distributed as dist

    span = [time.perf_counter(), float("nan")]
    state.intervals.append(span)
    tensor = bucket.buffer().div_(dist.get_world_size())
    future = dist.all_reduce(tensor, async_op=True).get_future()

    def done(fut):
        span[1] = time.perf_counter()  # runs when the allreduce has completed
        return fut.value()[0]

    return future.then(done)


def init_torch_distributed(comm: MPI.Comm, device: torch.device) -> str:
    """Start torch.distributed on the MPI job's ranks (collective; start-up only, so pickle-based
    MPI calls are fine). Rank 0 picks an address its peers can reach (``rendezvous_address``) and a
    free TCP port (bound to port 0), and broadcasts both."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return backend
    hosts = comm.allgather(world.node_name())  # blocks until every rank reported its host
    address = None
    if comm.Get_rank() == 0:
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        address = (rendezvous_address(hosts[0], hosts[1:]), port)
    host, port = comm.bcast(address, root=0)  # blocks until rank 0 has chosen
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=comm.Get_rank(),
                            world_size=comm.Get_size(), timeout=datetime.timedelta(seconds=120))
    return backend


def rendezvous_address(me: str, peers: list[str], tries: int = 4) -> str:
    """An address of this host (named ``me``) that the hosts ``peers`` can reach.

    - every peer on this host: ``127.0.0.1``;
    - else the source address of the interface this host would use to reach a peer (a UDP
      ``connect`` only looks up the route, no packet leaves), for the first of ``tries`` other
      hosts whose names resolve;
    - else the first non-loopback address this host's own name resolves to;
    - else the name itself.
    Names resolve through DNS or a hosts file alone: ``socket.getfqdn()`` failed on emulated
    nodes whose names exist only in a bind-mounted ``/etc/hosts`` (no reverse lookup).
    """
    others = list(dict.fromkeys(h for h in peers if h != me))
    if not others:
        return "127.0.0.1"
    for peer in others[:tries]:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.connect((socket.gethostbyname(peer), 9))
                source = udp.getsockname()[0]
        except OSError:
            continue
        if not source.startswith("127."):
            return source
    try:
        addresses = socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        addresses = []
    return next((a for a in addresses if not a.startswith("127.")), me)


# ---------------------------------------------------------------- the bench
def _validated(args) -> tuple[config.TrainConfig, list[str]]:
    raw = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    cfg = config.parse([*_BENCH_DEFAULTS, *raw, "--out", "unused"], quiet=world.rank() != 0)
    if cfg.dropout != 0:
        raise UsageError(f"--dropout {cfg.dropout}: the ddp bench compares losses step by step; use --dropout 0")
    if cfg.grad_accum != 1:
        raise UsageError(f"--grad-accum {cfg.grad_accum}: the ddp bench runs --grad-accum 1 (DDP would allreduce every micro-step)")
    algorithms = parse_algorithms(args.algorithms)
    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup}: must be >= 0")
    if args.warmup >= cfg.steps:
        raise UsageError(f"--warmup {args.warmup}: must be below --steps {cfg.steps}, or nothing is timed")
    if args.block_steps < 1:
        raise UsageError(f"--block-steps {args.block_steps}: must be >= 1")
    if not 1 <= args.check_steps <= cfg.steps:
        raise UsageError(f"--check-steps {args.check_steps}: must be between 1 and --steps {cfg.steps}")
    if not args.tolerance > 0:
        raise UsageError(f"--tolerance {args.tolerance}: must be > 0")
    for option, path in (("--json", args.json_path), ("--plot", args.plot)):
        if path and not Path(path).expanduser().resolve().parent.is_dir():
            raise UsageError(f"{option} {path}: its directory does not exist")
    return cfg, algorithms


def _measure(runner: Runner, comm: MPI.Comm, warmup: int, tokens_per_step: int, losses: np.ndarray) -> dict:
    """Median step time (slowest rank per step), comm times and tokens/s of one runner. SYNC."""
    steps = runner.timer.last(len(runner.timer.steps))[warmup:]
    totals = np.array([s["total"] for s in steps])
    comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.MAX)  # a step lasts as long as its slowest rank
    per_rank = np.array([[s.get(k, 0.0) for k in (*_PLOT_PHASES, "comm_total")] for s in steps])
    comm.Allreduce(MPI.IN_PLACE, per_rank, op=MPI.SUM)  # phases: mean over ranks
    per_rank /= comm.Get_size()
    medians = dict(zip((*_PLOT_PHASES, "comm_total"), np.median(per_rank, axis=0).tolist()))
    step = float(np.median(totals))
    return {
        "runner": runner.name,
        "tokens_per_s": tokens_per_step / step,
        "step_ms": step * 1e3,
        "comm_ms": None if runner.comm_timer is not None else medians["comm"] * 1e3,  # DDP: inside backward
        "comm_total_ms": medians["comm_total"] * 1e3,
        "phases_ms": {k: medians[k] * 1e3 for k in _PLOT_PHASES},
        "timed_steps": len(steps),
        "losses": losses.tolist(),
    }


def _table(rows: list[dict]) -> str:
    lines = [f"{'runner':<14}{'tokens/s':>12}{'step ms':>10}{'comm ms':>10}{'comm total':>12}{'vs ddp':>8}"]
    for r in rows:
        exposed = f"{r['comm_ms']:10.2f}" if r["comm_ms"] is not None else f"{'(in bwd)':>10}"
        lines.append(f"{r['runner']:<14}{r['tokens_per_s']:12,.0f}{r['step_ms']:10.2f}{exposed}"
                     f"{r['comm_total_ms']:12.2f}{r['vs_ddp']:8.3f}")
    return "\n".join(lines)


def _plot(path: str, rows: list[dict], title: str) -> None:
    plt = pyplot()

    names = [r["runner"] for r in rows]
    x = list(range(len(rows)))
    fig, (tput, bars) = plt.subplots(1, 2, figsize=(11, 4.5))
    tput.bar(x, [r["tokens_per_s"] for r in rows], color=["tab:gray"] + ["tab:blue"] * (len(rows) - 1))
    for i, r in enumerate(rows):
        tput.text(i, r["tokens_per_s"], f"{r['vs_ddp']:.2f}x", ha="center", va="bottom", fontsize=8)
    tput.set_xticks(x, names, rotation=20)
    tput.set_ylabel("tokens/s (median step)")
    tput.set_title(title)
    bottom = [0.0] * len(rows)
    for phase in _PLOT_PHASES:
        heights = [r["phases_ms"][phase] for r in rows]
        bars.bar(x, heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    bars.set_xticks(x, names, rotation=20)
    bars.set_ylabel("median ms per step (mean over ranks)")
    bars.set_title("phases (DDP's comm runs inside backward)")
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> dict:
    cfg, algorithms = _validated(args)
    comm = world.WORLD
    p = comm.Get_size()
    device = world.pick_device(cfg.device)
    corpus = data.load(comm, cfg.data, cfg.cache_dir, cfg.val_fraction, cfg.block_size, cfg.data_io)  # SYNC
    backend = init_torch_distributed(comm, device)
    runners = [make_runner("ddp", cfg, comm, device, corpus.vocab_size, ddp=True)]
    runners += [make_runner(f"mpilm {a}", cfg, comm, device, corpus.vocab_size, algorithm=a) for a in algorithms]
    n_params = sum(t.numel() for t in runners[0].grads.flat.values())
    world.say(f"# mpilm vs DDP ({backend}): {p} ranks, device {device}, {cfg.model} {n_params / 1e6:.2f}M params, "
              f"batch {cfg.batch_size}x{cfg.block_size} per rank, {cfg.optimizer}, {cfg.steps} steps "
              f"({args.warmup} warm-up), turns of {args.block_steps} steps, fp32, buckets {cfg.bucket_mb:g} MiB")

    turn = 0
    while any(r.steps_done < cfg.steps for r in runners):
        # rotate who goes first, so no runner always follows the same one
        for k in range(len(runners)):
            runner = runners[(k + turn) % len(runners)]
            comm.Barrier()  # SYNC: every rank starts the turn together
            run_steps(runner, cfg, corpus, device, min(args.block_steps, cfg.steps - runner.steps_done))
        turn += 1

    tokens_per_step = cfg.batch_size * cfg.block_size * p
    rows = []
    for runner in runners:
        losses = torch.stack(runner.losses).double().cpu().numpy()
        comm.Allreduce(MPI.IN_PLACE, losses, op=MPI.SUM)  # SYNC: the loss averaged over ranks, per step
        rows.append(_measure(runner, comm, args.warmup, tokens_per_step, losses / p))
    ddp = rows[0]
    for row in rows:
        row["vs_ddp"] = row["tokens_per_s"] / ddp["tokens_per_s"]
        row["loss_max_abs_diff"] = float(np.max(np.abs(np.array(row["losses"][:args.check_steps])
                                                       - np.array(ddp["losses"][:args.check_steps]))))
    worst = max(rows[1:], key=lambda r: r["loss_max_abs_diff"])
    best = max(rows[1:], key=lambda r: r["tokens_per_s"])
    check_ok = worst["loss_max_abs_diff"] <= args.tolerance
    world.say(_table(rows))
    world.say(f"# best mpilm: {best['runner']} at {best['vs_ddp']:.3f}x DDP's tokens/s")
    world.say(f"# loss check, first {args.check_steps} steps vs DDP: max |diff| {worst['loss_max_abs_diff']:.2e} "
              f"({worst['runner']}), tolerance {args.tolerance:g}: {'ok' if check_ok else 'MISMATCH'}")
    result = {"world_size": p, "backend": backend, "device": str(device), "config": cfg.to_dict(),
              "warmup": args.warmup, "block_steps": args.block_steps, "check_steps": args.check_steps,
              "tolerance": args.tolerance, "loss_check_ok": check_ok, "rows": rows}
    if world.rank() == 0:
        if args.json_path:
            Path(args.json_path).expanduser().write_text(json.dumps(result, indent=1) + "\n")
            world.say(f"# wrote {args.json_path}")
        if args.plot:
            _plot(args.plot, rows, f"mpilm vs DDP, {p} ranks, {cfg.model}")
            world.say(f"# wrote {args.plot}")
    import torch.distributed as dist

    dist.destroy_process_group()
    if not check_ok:
        raise SystemExit(1)  # on every rank alike: the verdict comes from rank-averaged losses
    return result
