"""``mpirun -np N python -m mpilm.bench ddp [--algorithms mpi,ring,...] [-- TRAIN OPTIONS]``.

mpilm against ``torch.nn.parallel.DistributedDataParallel`` on the same model, data, batch,
optimizer, learning-rate schedule and steps, in the same processes. Every runner is a
``mpilm.run.Run`` built from the same config over the same loaded corpus: the same seeded model
broadcast from rank 0, the same flat-buffer ``GradBuffer``, clipping, optimizer and batches
(``mpilm.data.sample_batch`` by (seed, rank, step)), and the same ``Run.step()``. They differ
only in how gradients are averaged:

- ``ddp <N>MB`` (one per ``--ddp-bucket-mb``): the model is wrapped in DDP (gloo on CPU, nccl on
  CUDA) with that bucket cap; DDP's autograd hooks allreduce its buckets *during* backward and
  copy the averages into the Run's ``.grad`` views; the Run's own reducer is off.
- ``mpilm <algorithm>``: the Run's own sync (``--algorithms``, as ``--allreduce`` in training),
  with the train options' ``--overlap`` / ``--bucket-mb`` / ``--zero`` / ``--compress``.

The runners take turns, ``--block-steps`` steps at a time, so they share the machine's noise.
A step's time is the slowest rank's; the table shows the median after ``--warmup`` steps,
tokens/s from it, exposed comm (what the loop waited on; for DDP it is hidden inside backward
and not separable) and total comm (mpilm: the sync; DDP: the union of its bucket allreduces, from
issue to completion, timed by a comm hook equivalent to DDP's default allreduce), and the ratio
to the fastest DDP runner. Correctness check: each runner's first ``--check-steps`` losses
(averaged over ranks) must equal the first DDP runner's to ``--tolerance``; the command exits 1
if they do not.

Limits: fp32 on every device (no autocast) so the loss check is meaningful; ``--dropout 0`` and
``--grad-accum 1`` (DDP would allreduce every micro-step without ``no_sync``); torch.distributed
rendezvous over TCP at rank 0's address on the interface that routes to its peers, port chosen by
rank 0, both broadcast over MPI. Gloo still picks its own interface for the data by resolving
each host's name: set ``GLOO_SOCKET_IFNAME`` where a name resolves to loopback.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from mpilm import config, data
from mpilm.comm import world
from mpilm.metrics import hidden_share
from mpilm.errors import UsageError
from mpilm.run import Run, build
from mpilm.bench import parse_algorithms, pyplot

DESCRIPTION = "mpilm vs torch DistributedDataParallel on the same model and data"

DEFAULT_ALGORITHMS = "mpi,ring,rhd,tree"
_BENCH_DEFAULTS = ["--steps", "40"]  # before the user's train options, which override them
_PLOT_PHASES = ("data", "forward", "backward", "compress", "comm", "optimizer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algorithms", default=DEFAULT_ALGORITHMS,
                        help="mpilm allreduce algorithms to run against DDP, comma-separated (default %(default)s)")
    parser.add_argument("--overlap", default=None, metavar="on,off",
                        help="run each mpilm algorithm with overlap on and/or off (default: as the train options say)")
    parser.add_argument("--zero", default=None, metavar="0,1",
                        help="run each mpilm algorithm with ZeRO stage 0 and/or 1 (default: as the train options say)")
    parser.add_argument("--ddp-bucket-mb", default="25",
                        help="DDP bucket caps to run, comma-separated; the ratio is to the fastest (default %(default)s, "
                             "DDP's own default)")
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
    """One training job inside this process: a ``Run``, and for DDP the timer of its bucket allreduces."""

    name: str
    run: Run
    comm_timer: _DDPCommTimer | None = None

    @property
    def steps_done(self) -> int:
        return self.run.step_index


def make_runner(name: str, cfg: config.TrainConfig, corpus: data.Corpus, *, ddp_bucket_mb: float | None = None) -> Runner:
    """A Run of ``cfg`` over the loaded ``corpus`` (SYNC: model broadcast, bucket map check).

    With ``ddp_bucket_mb`` the model is wrapped in DDP with that bucket cap and the Run's own
    gradient sync is off: DDP copies its averaged buckets into the existing ``.grad`` tensors,
    which are the Run's flat-buffer views, and the Run goes on to clip and step as for mpilm.
    """
    if ddp_bucket_mb is None:
        job = build(cfg, corpus=corpus)
        job.autocast = None  # fp32 on every device, so the loss check is meaningful
        return Runner(name, job)
    comm_timer = _DDPCommTimer()

    def wrap(model):
        device = next(model.parameters()).device
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=ddp_bucket_mb)
        wrapped.register_comm_hook(comm_timer, _timed_allreduce_hook)
        return wrapped

    job = build(dataclasses.replace(cfg, overlap=False), corpus=corpus, wrap=wrap, reducer=None)
    job.autocast = None
    return Runner(name, job, comm_timer)


def run_steps(runner: Runner, count: int) -> None:
    """``count`` more training steps of ``runner``: the schedule and batches depend only on the step."""
    for _ in range(count):
        runner.run.step()
        if runner.comm_timer is not None:  # DDP's allreduces ran inside backward: credit their union
            record = runner.run.timer.steps[-1]
            record["comm_total"] = record.get("comm_total", 0.0) + runner.comm_timer.take()


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
    try:
        ddp_buckets = [float(v) for v in args.ddp_bucket_mb.split(",") if v.strip()]
    except ValueError:
        ddp_buckets = []
    if not ddp_buckets or any(not mb > 0 for mb in ddp_buckets):
        raise UsageError(f"--ddp-bucket-mb {args.ddp_bucket_mb}: expected sizes in MB > 0, comma-separated, e.g. 1,5,25")
    overlaps = _choices(args.overlap, "--overlap", {"on": True, "off": False}, [cfg.overlap])
    zeros = _choices(args.zero, "--zero", {"0": 0, "1": 1}, [cfg.zero])
    variants = [dataclasses.replace(cfg, allreduce=a, overlap=o, zero=z) for a in algorithms for o in overlaps for z in zeros]
    for variant in variants:
        config.check(variant)  # e.g. --zero 1 with tree: the same error as in training
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
    return cfg, variants, ddp_buckets


def _choices(text: str | None, flag: str, allowed: dict, default: list) -> list:
    if text is None:
        return default
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or any(n not in allowed for n in names) or len(set(names)) != len(names):
        raise UsageError(f"{flag} {text}: expected a comma-separated subset of {','.join(allowed)}")
    return [allowed[n] for n in names]


def variant_name(cfg: config.TrainConfig, all_variants: list[config.TrainConfig]) -> str:
    """``mpilm ring``, plus ``overlap``/``no-overlap`` and ``zero1`` where the variants differ in them."""
    name = f"mpilm {cfg.allreduce}"
    if len({v.overlap for v in all_variants}) > 1:
        name += {True: " overlap", False: " no-overlap", None: " overlap-auto"}[cfg.overlap]
    if len({v.zero for v in all_variants}) > 1 and cfg.zero:
        name += " zero1"
    return name


def _measure(runner: Runner, comm: MPI.Comm, warmup: int, tokens_per_step: int, losses: np.ndarray) -> dict:
    """Median step time (slowest rank per step), comm times and tokens/s of one runner. SYNC."""
    steps = runner.run.timer.last(len(runner.run.timer.steps))[warmup:]
    totals = np.array([s["total"] for s in steps])
    comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.MAX)  # a step lasts as long as its slowest rank
    per_rank = np.array([[s.get(k, 0.0) for k in (*_PLOT_PHASES, "comm_total")] for s in steps])
    comm.Allreduce(MPI.IN_PLACE, per_rank, op=MPI.SUM)  # phases: mean over ranks
    per_rank /= comm.Get_size()
    medians = dict(zip((*_PLOT_PHASES, "comm_total"), np.median(per_rank, axis=0).tolist()))
    step = float(np.median(totals))
    state = np.array([float(runner.run.optimizer_state_bytes())])
    comm.Allreduce(MPI.IN_PLACE, state, op=MPI.MAX)  # the largest per-rank optimizer state
    return {
        "optimizer_state_bytes": float(state[0]),
        "runner": runner.name,
        "tokens_per_s": tokens_per_step / step,
        "step_ms": step * 1e3,
        "comm_ms": None if runner.comm_timer is not None else medians["comm"] * 1e3,  # DDP: inside backward
        "hidden_share": None if runner.comm_timer is not None else hidden_share(medians["comm"], medians["comm_total"]),
        "comm_total_ms": medians["comm_total"] * 1e3,
        "compute_ms": sum(medians[k] for k in _PLOT_PHASES if k != "comm") * 1e3,
        "phases_ms": {k: medians[k] * 1e3 for k in _PLOT_PHASES},
        "timed_steps": len(steps),
        "losses": losses.tolist(),
    }


def _bounds(rows: list[dict]) -> None:
    """``step_vs_bound``: step time / max(compute, total comm), the best overlap can do.

    Compute comes from the runner's no-overlap sibling where there is one (its phases are not
    slowed by a communication thread sharing the cores), else from the runner itself.
    """
    by_name = {r["runner"]: r for r in rows}
    for r in rows:
        sibling = by_name.get(r["runner"].replace(" overlap", " no-overlap"), r)
        r["bound_ms"] = max(sibling["compute_ms"], r["comm_total_ms"])
        r["step_vs_bound"] = r["step_ms"] / r["bound_ms"] if r["bound_ms"] > 0 else None


def _table(rows: list[dict]) -> str:
    width = max(14, *(len(r["runner"]) + 2 for r in rows))
    lines = [f"{'runner':<{width}}{'tokens/s':>10}{'step ms':>9}{'compute':>9}{'comm ms':>9}{'comm total':>11}"
             f"{'hidden':>8}{'step/bound':>11}{'vs ddp':>8}"]
    for r in rows:
        exposed = f"{r['comm_ms']:9.1f}" if r["comm_ms"] is not None else f"{'(in bwd)':>9}"
        hidden = f"{r['hidden_share']:8.0%}" if r["hidden_share"] is not None else f"{'-':>8}"
        bound = f"{r['step_vs_bound']:11.2f}" if r["comm_ms"] is not None and r["step_vs_bound"] else f"{'-':>11}"
        lines.append(f"{r['runner']:<{width}}{r['tokens_per_s']:10,.0f}{r['step_ms']:9.1f}{r['compute_ms']:9.1f}"
                     f"{exposed}{r['comm_total_ms']:11.1f}{hidden}{bound}{r['vs_ddp']:8.3f}")
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
    cfg, variants, ddp_buckets = _validated(args)
    comm = world.WORLD
    p = comm.Get_size()
    device = world.pick_device(cfg.device)
    corpus = data.load(comm, cfg.data, cfg.cache_dir, cfg.val_fraction, cfg.block_size, cfg.data_io)  # SYNC
    backend = init_torch_distributed(comm, device)
    runners = [make_runner(f"ddp {mb:g}MB", cfg, corpus, ddp_bucket_mb=mb) for mb in ddp_buckets]
    runners += [make_runner(variant_name(v, variants), v, corpus) for v in variants]
    n_params = runners[0].run.grads.numel
    world.say(f"# mpilm vs DDP ({backend}): {p} ranks, device {device}, {cfg.model} {n_params / 1e6:.2f}M params, "
              f"batch {cfg.batch_size}x{cfg.block_size} per rank, {cfg.optimizer}, {cfg.steps} steps "
              f"({args.warmup} warm-up), turns of {args.block_steps} steps, fp32, mpilm buckets {cfg.bucket_mb:g} MiB, "
              f"DDP buckets {', '.join(f'{mb:g}' for mb in ddp_buckets)} MB")

    turn = 0
    while any(r.steps_done < cfg.steps for r in runners):
        # rotate who goes first, so no runner always follows the same one
        for k in range(len(runners)):
            runner = runners[(k + turn) % len(runners)]
            comm.Barrier()  # SYNC: every rank starts the turn together
            run_steps(runner, min(args.block_steps, cfg.steps - runner.steps_done))
        turn += 1

    tokens_per_step = cfg.batch_size * cfg.block_size * p
    rows = []
    for runner in runners:
        losses = torch.stack(runner.run.losses).double().cpu().numpy()
        comm.Allreduce(MPI.IN_PLACE, losses, op=MPI.SUM)  # SYNC: the loss averaged over ranks, per step
        rows.append(_measure(runner, comm, args.warmup, tokens_per_step, losses / p))
    n_ddp = len(ddp_buckets)
    ddp = max(rows[:n_ddp], key=lambda r: r["tokens_per_s"])  # DDP at its best bucket size
    for row in rows:
        row["vs_ddp"] = row["tokens_per_s"] / ddp["tokens_per_s"]
        row["loss_max_abs_diff"] = float(np.max(np.abs(np.array(row["losses"][:args.check_steps])
                                                       - np.array(rows[0]["losses"][:args.check_steps]))))
    _bounds(rows)
    worst = max(rows[1:], key=lambda r: r["loss_max_abs_diff"]) if len(rows) > 1 else rows[0]
    best = max(rows[n_ddp:], key=lambda r: r["tokens_per_s"])
    check_ok = worst["loss_max_abs_diff"] <= args.tolerance
    world.say(_table(rows))
    world.say(f"# best mpilm: {best['runner']} at {best['vs_ddp']:.3f}x the tokens/s of DDP at its best "
              f"bucket size ({ddp['runner']})")
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
