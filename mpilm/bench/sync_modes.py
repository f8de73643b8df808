"""``python -m mpilm.bench sync-modes [--np N] [--cluster [--link 100mbit,1gbit]] [--modes ...] [-- TRAIN OPTIONS]``.

Does: launches one ``mpilm.train`` job per training mode (``--modes``, default every row of
issue #13), each with the same model, data, learning-rate schedule and *token budget*, one after
the other at each ``--link`` rate, and tabulates them against the ``sync`` row of the same rate:

- ``sync``: ``--sync sync`` (gradients averaged every step); ``sync-topk``: the same with
  ``--compress topk`` (top-k with error feedback, under the run's optimizer, AdamW by default);
  ``sync-sign``: with ``--compress sign`` (scaled sign with error feedback, the one for AdamW);
- ``async``: ``--sync async`` on N + 1 ranks: the same N ranks computing gradients (workers,
  ranks 1..N) and one more, rank 0, the parameter server, which computes none (parameter servers
  are extra processes, as in every PS system; the N-rank alternative, a server in place of a
  worker, has one rank fewer computing and cannot finish sooner). Its ``--steps`` is the
  server's budget of gradients in all, ``N x S`` (``async_steps``), taken from whichever workers
  send them, and its ``--warmup-steps`` and ``--eval-every`` are N times the sync rows', so the
  learning-rate schedule and the evaluations fall on the same token counts; ``async-psK``: the
  same with ``--ps-ranks K``, K servers (ranks 0..K-1) each holding a slice, on N + K ranks;
  ``async-pipe`` / ``async-psK-pipe``: with ``--async-pipeline`` (each worker computes its next
  gradient while the last one travels);
- ``local-H``: ``--sync local --local-steps H``; ``diloco-H``: ``--sync diloco --local-steps H``
  (with the bench's ``--outer-lr`` / ``--outer-momentum``). ``--steps`` must be a multiple of H, so
  every run ends on an exchange.

Evaluations fall on the same token counts in every row: every ``--eval-every`` E sync steps,
every E x N server updates in async (one batch each), and every E rounded up to a multiple of H in
local/diloco (on an exchange, where every rank holds the same parameters; between exchanges each
rank would evaluate a different model). The bench reads each job's output as it comes, and the
time of each ``val loss`` line, from the job's ``step 0`` evaluation (just before training
starts), gives the curve of val loss against wall-clock time (the PNG) and *reach*: when a row's
val loss first falls to the sync row's final val loss (linear between evaluations; ``-`` if it
never does), as a share of sync's time to its own final evaluation.

Columns: final val loss (``summary.json``), wall time (its ``wall_s``: from the first step to the
end, evaluations included), tokens/s (the tokens processed over that wall time), MB per step per
rank, the async row's mean staleness (and dropped gradients), and the ratios to sync: bytes (sync
/ row: "x fewer"), time and loss (row / sync), reach. *Bytes* are everything a rank takes in from
its peers, through MPI or by reading their shared memory (``bytes_received_per_step`` +
``bytes_shm_read_per_step``; over MPI the ranks receive what they send), over the whole run, per
sync step's worth of tokens (N batches). The summary's per-step means leave out step 1, which in
local/diloco with H > 1 has no exchange, so the run total counts exchanges: the mean x the steps
it covers / the exchanges among them x all exchanges. In async the ranks' step counts differ (the
server counts updates, a worker its gradients) and every gradient crosses twice (G bytes of
gradient to the server, G bytes of parameters back), so its run total is the per-step mean over
ranks x 2 x the gradients taken. ``--slow-rank R --slow-factor F`` goes to every row (rank R
sleeps (F-1) x its compute time each step; in async the same computing rank is worker R + K).
With ``--repeat`` every row runs that many times, in turn (every row once, then again); the row
shows the run with the median wall time, and its time ratio and reach are the medians of each
repeat's own (a repeat's rows run back to back, under the same load of a shared machine; whole
minutes apart that load differs).

Does not: tune anything (each row runs as configured), or run rows at the same time (they would
share the cores). ``--json`` keeps every run (its curve, summary figures and command); ``--plot``
draws val loss against wall time, one panel per link rate.

Limits: a launcher, run as one process (not under ``mpirun -np >1``). ``--cluster`` expects the
emulated cluster named by ``MPILM_CLUSTER`` to be up (``python -m mpilm.cluster up --nodes 3``;
root), with a slot for each of async's servers beyond the N ranks (``--np`` defaults to every slot,
or every slot but K when an async row with K servers is listed; Hydra fills the nodes in order, so
sync's N ranks take the first N slots and async's servers and workers N + K); each ``--link`` rate is set on every node's link with ``cluster link NODE --rate`` before
that rate's rows and the cluster's own rate is set back at the end. Every job runs in its own
process group, killed after ``--timeout`` seconds (on the cluster every process on its nodes too).
Wall times on a shared machine move with its load: rows of one invocation run back to back, so
compare their ratios, not absolute times across invocations.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mpilm import cluster, config
from mpilm.bench import pyplot
from mpilm.bench.scaling import _child_env, _launcher
from mpilm.comm import world
from mpilm.errors import UsageError

DESCRIPTION = "sync vs async vs local SGD vs DiLoCo vs top-k at one token budget: val loss, wall time, bytes, on slow links"

DEFAULT_MODES = "sync,async,local-4,local-16,diloco-50,diloco-100,sync-topk,sync-sign"
# options the bench sets per row itself (mode, budget, cadence, straggler, outputs)
_OWNED = ("--sync", "--steps", "--out", "--eval-every", "--local-steps", "--local-average-optimizer",
          "--no-local-average-optimizer", "--outer-lr", "--outer-momentum", "--outer-nesterov", "--no-outer-nesterov",
          "--max-staleness", "--staleness-lr", "--no-staleness-lr", "--compress", "--slow-rank", "--slow-factor")
# quieter defaults for the child runs; anything after -- overrides them
_CHILD_DEFAULTS = ["--eval-batches", "16", "--log-every", "10"]
_EVAL_LINE = re.compile(r"^step (\d+): val loss (\S+)")                       # every mode's evaluations
_SERVER_EVAL_LINE = re.compile(r"^update\s+(\d+) \|.*\| val loss (\S+)$")     # the async server's
# the issue's targets, checked where their rows were measured
DILOCO_TARGET = {"mode": "diloco-50", "bytes_fewer": 50.0, "loss_ratio": 1.03, "reach_share": 0.5}
ASYNC_TARGET = {"mode": "async", "sooner": 1.3, "loss_ratio": 1.05}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modes", default=DEFAULT_MODES,
                        help="rows, comma-separated: sync, sync-topk, sync-sign, async, local-H, diloco-H (default %(default)s)")
    parser.add_argument("--np", dest="np", type=int, default=None,
                        help="ranks of every job (default 2; with --cluster every slot of the cluster)")
    parser.add_argument("--steps", type=int, default=400,
                        help="sync steps of the token budget: N x steps batches in every row (default %(default)s)")
    parser.add_argument("--eval-every", type=int, default=50,
                        help="evaluate every this many sync steps' worth of tokens (default %(default)s)")
    parser.add_argument("--cluster", action="store_true",
                        help="launch through python -m mpilm.cluster run on the emulated cluster named by MPILM_CLUSTER, "
                             "which must be up already")
    parser.add_argument("--link", default=None,
                        help="with --cluster: link rates to run every row at, comma-separated tc rates, e.g. "
                             "100mbit,1gbit (default: the cluster's own)")
    parser.add_argument("--slow-rank", type=int, default=-1,
                        help="make this rank (0..N-1) a straggler in every row (async: the same computing rank, worker R + K); "
                             "-1: none")
    parser.add_argument("--slow-factor", type=float, default=2.0, help="with --slow-rank: how many times slower it computes")
    parser.add_argument("--outer-lr", type=float, default=None, help="diloco rows: the outer learning rate (default: train's)")
    parser.add_argument("--outer-momentum", type=float, default=None,
                        help="diloco rows: the outer momentum (default: train's)")
    parser.add_argument("--max-staleness", type=int, default=None, help="async row: --max-staleness (default: train's)")
    parser.add_argument("--staleness-lr", action="store_true", help="async row: lr / staleness")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every row this many times, in turn; the run with the median wall time is the row")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds before a job is killed (default %(default)s)")
    parser.add_argument("--mpirun", default=None, help="local launcher (default: mpirun next to this python, else on PATH)")
    parser.add_argument("--out", default=None,
                        help="keep every run's output and log under this directory (default: a temporary one, removed)")
    parser.add_argument("--json", dest="json_path", default=None, help="write every run and the rows to this JSON file")
    parser.add_argument("--plot", default=None, help="write val loss against wall time, a panel per link rate, to this PNG")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN OPTIONS",
                        help="options for mpilm.train (model, batch, optimizer, data ...), after --; the same in every row")


# ---------------------------------------------------------------- rows and their options
@dataclass(frozen=True)
class Mode:
    """One row: ``name`` as in ``--modes``; the train options that make it."""

    name: str
    sync: str
    local_steps: int | None = None
    compress: str = "none"
    ps_ranks: int = 1  # async: parameter server ranks (``async-psK``)
    pipeline: bool = False  # async: --async-pipeline (``async-pipe``, ``async-psK-pipe``)


def parse_modes(text: str) -> list[Mode]:
    """``sync,async,local-4,diloco-50,sync-topk`` -> Modes; UsageError for anything else."""
    modes = []
    for name in (m.strip() for m in text.split(",")):
        if not name:
            continue
        if name == "sync":
            modes.append(Mode(name, name))
        elif name in ("sync-topk", "sync-sign"):
            modes.append(Mode(name, "sync", compress=name.removeprefix("sync-")))
        elif m := re.fullmatch(r"async(?:-ps(\d+))?(-pipe)?", name):
            if m.group(1) is not None and int(m.group(1)) < 1:
                raise UsageError(f"--modes {name}: K must be >= 1")
            modes.append(Mode(name, "async", ps_ranks=int(m.group(1) or 1), pipeline=m.group(2) is not None))
        elif m := re.fullmatch(r"(local|diloco)-(\d+)", name):
            if int(m.group(2)) < 1:
                raise UsageError(f"--modes {name}: H must be >= 1")
            modes.append(Mode(name, m.group(1), local_steps=int(m.group(2))))
        else:
            raise UsageError(f"--modes {name}: unknown; use sync, sync-topk, sync-sign, async, async-psK, async-pipe, "
                             "async-psK-pipe, local-H or diloco-H (K parameter servers, H steps between exchanges, "
                             "e.g. diloco-50)")
    if not modes:
        raise UsageError("--modes: empty list; name at least one row, e.g. sync,diloco-50")
    if len({m.name for m in modes}) != len(modes):
        raise UsageError(f"--modes {text}: a row is listed twice")
    return modes


def async_steps(steps: int, n: int) -> int:
    """The async server's ``--steps`` (gradients in all, one batch each): the N x ``steps`` batches
    of the sync rows."""
    return steps * n


def ranks_for(mode: Mode, n: int) -> int:
    """The job's ranks: N, and for async N workers plus the servers."""
    return n + mode.ps_ranks if mode.sync == "async" else n


def eval_every_for(mode: Mode, eval_every: int, n: int) -> int:
    """The row's ``--eval-every``: on the same token counts as sync's (async: server updates of one
    batch each; local/diloco: rounded up to an exchange)."""
    if mode.sync == "async":
        return eval_every * n
    if mode.local_steps:
        return math.ceil(eval_every / mode.local_steps) * mode.local_steps
    return eval_every


def mode_args(mode: Mode, args, n: int, shared: config.TrainConfig) -> list[str]:
    """The train options that make ``mode`` (after the ``shared`` ones of every row)."""
    steps = async_steps(args.steps, n) if mode.sync == "async" else args.steps
    eval_every = eval_every_for(mode, args.eval_every, n)
    out = ["--sync", mode.sync, "--steps", str(steps), "--eval-every", str(eval_every)]
    if mode.local_steps:
        out += ["--local-steps", str(mode.local_steps)]
    if mode.compress != "none":
        out += ["--compress", mode.compress]
    if mode.sync == "diloco":
        out += [*(["--outer-lr", f"{args.outer_lr:g}"] if args.outer_lr is not None else []),
                *(["--outer-momentum", f"{args.outer_momentum:g}"] if args.outer_momentum is not None else [])]
    if mode.sync == "async":  # the server evaluates only on its log lines: make every evaluation one
        out += ["--log-every", str(math.gcd(shared.log_every, eval_every)),
                "--warmup-steps", str(shared.warmup_steps * n)]  # the same tokens of warm-up as sync's
        out += [*(["--max-staleness", str(args.max_staleness)] if args.max_staleness is not None else []),
                *(["--staleness-lr"] if args.staleness_lr else []),
                *(["--ps-ranks", str(mode.ps_ranks)] if mode.ps_ranks > 1 else []),
                *(["--async-pipeline"] if mode.pipeline else [])]
    if args.slow_rank >= 0:  # the same computing rank: async's workers are ranks K..K+N-1
        slowed = args.slow_rank + mode.ps_ranks if mode.sync == "async" else args.slow_rank
        out += ["--slow-rank", str(slowed), "--slow-factor", f"{args.slow_factor:g}"]
    return out


def _train_args(raw: list[str]) -> list[str]:
    args = raw[1:] if raw[:1] == ["--"] else list(raw)
    for arg in args:
        if arg.split("=")[0] in _OWNED:
            raise UsageError(f"{arg.split('=')[0]} after --: set per row by the sync-modes bench (use its own --modes/"
                             "--steps/--eval-every/--slow-rank/--outer-lr/...; outputs go under --out)")
    return args


def _check(args, modes: list[Mode], train_args: list[str], n: int) -> config.TrainConfig:
    """Every row's full train options through train's own checks, before anything is launched;
    returns the options the rows share."""
    if args.steps < 1 or args.eval_every < 1:
        raise UsageError(f"--steps {args.steps} / --eval-every {args.eval_every}: must be >= 1")
    if args.repeat < 1:
        raise UsageError(f"--repeat {args.repeat}: must be >= 1")
    if not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout}: must be > 0")
    if args.slow_rank >= n:
        raise UsageError(f"--slow-rank {args.slow_rank}: the jobs have {n} ranks (0-{n - 1})")
    if n < 2 and any(m.sync in ("local", "diloco") or m.compress != "none" for m in modes):
        raise UsageError(f"--np {n}: the modes exchange between ranks; use 2 or more")
    shared = config.parse([*_CHILD_DEFAULTS, *train_args, "--out", "unused"], quiet=True)
    for mode in modes:
        if mode.local_steps and args.steps % mode.local_steps:
            raise UsageError(f"--steps {args.steps}: not a multiple of {mode.name}'s H = {mode.local_steps}, so its run "
                             "would end between exchanges (every rank on a model of its own)")
        config.parse([*_CHILD_DEFAULTS, *train_args, *mode_args(mode, args, n, shared), "--out", "unused"],
                     quiet=True)
    return shared  # the model, batch and data of every row


# ---------------------------------------------------------------- one job
@dataclass
class Job:
    """One finished launch: its exit status and every output line with its arrival time."""

    returncode: int
    lines: list[tuple[float, str]]
    timed_out: bool


def launch(cmd: list[str], log: Path, timeout: float, nodes: cluster.Cluster | None) -> Job:
    """Run ``cmd`` in its own process group, stdout and stderr to ``log``, each line timestamped
    (``time.monotonic``) as it arrives. After ``timeout`` seconds the group is killed, and on the
    cluster every process on its nodes (the ranks Hydra started there are not in the group)."""
    env = {**_child_env(), "PYTHONUNBUFFERED": "1"}  # the ranks' lines arrive as they are printed
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=env, start_new_session=True)
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for node in nodes.nodes if nodes is not None else []:
            _cluster_cli("kill", node.name)

    timer = threading.Timer(timeout, kill)
    timer.start()
    lines = []
    try:
        with open(log, "w") as fh:
            for line in proc.stdout:  # blocks until the job prints (or ends, or is killed)
                lines.append((time.monotonic(), line.rstrip("\n")))
                fh.write(line)
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # interrupted while reading: take the job down with us
            kill()
            proc.wait()
    return Job(proc.returncode, lines, expired.is_set())


def _cluster_cli(*words: str) -> None:
    """``python -m mpilm.cluster WORDS`` in this process (its checks and messages); RuntimeError if it fails."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        status = cluster.main(list(words))
    if status != 0:
        raise RuntimeError(f"sync-modes: python -m mpilm.cluster {' '.join(words)}: {captured.getvalue().strip()}")


def curve(lines: list[tuple[float, str]], batches_per_count: int, tokens_per_batch: int) -> list[dict]:
    """Val loss against wall time from a job's output: the ``step 0`` evaluation is time 0 (training
    starts right after it); async's server lines count updates of one batch, the others' steps
    ``batches_per_count`` (N) batches."""
    points, t0 = [], None
    for t, text in lines:
        m = _EVAL_LINE.match(text) or _SERVER_EVAL_LINE.match(text)
        if not m:
            continue
        count, loss = int(m.group(1)), float(m.group(2))
        if t0 is None:
            t0 = t
        point = {"t_s": t - t0, "tokens": count * batches_per_count * tokens_per_batch, "val_loss": loss}
        if points and points[-1]["tokens"] == point["tokens"]:  # async: the server's and the final evaluation
            points[-1] = point
        else:
            points.append(point)
    return points


def reach_time(points: list[dict], target: float) -> float | None:
    """First time the curve is at or below ``target``, linear between evaluations; None if never."""
    for before, point in zip(points, points[1:]):
        if point["val_loss"] <= target:
            if before["val_loss"] <= target:
                return before["t_s"]
            share = (before["val_loss"] - target) / (before["val_loss"] - point["val_loss"])
            return before["t_s"] + share * (point["t_s"] - before["t_s"])
    return points[0]["t_s"] if points and points[0]["val_loss"] <= target else None


def run_row(mode: Mode, summary: dict, job: Job, n: int, tokens_per_batch: int) -> dict:
    """The row's figures from its summary.json and its timed output lines."""
    is_async = mode.sync == "async"
    batches = summary["gradients_this_run"] if is_async else summary["steps"] * n
    tokens = batches * tokens_per_batch
    per_rank_step = summary["bytes_received_per_step"] + summary.get("bytes_shm_read_per_step", 0.0)
    if is_async:  # every gradient taken is G bytes up and G back (in K slices, one per server). Per
        # step (a worker's gradient, a server's take) a worker receives G and a server G / K, so the
        # ranks' per-step means sum to (N + 1) G: the run moved that sum x 2 / (N + 1) per batch
        run_bytes = per_rank_step * ranks_for(mode, n) * 2 / (n + 1) * batches
    else:  # the mean leaves out step 1 (warm-up), which exchanges only when every step does (H = 1)
        every, steps = mode.local_steps or 1, summary["steps"]
        measured = steps // every - (1 if every == 1 else 0)
        run_bytes = per_rank_step * (steps - 1) * (steps // every) / measured * n if measured else 0.0
    row = {
        "mode": mode.name,
        "sync": mode.sync,
        "local_steps": mode.local_steps,
        "compress": mode.compress,
        "world_size": ranks_for(mode, n),
        "steps": summary["steps"],
        "tokens": tokens,
        "gradient_bytes": summary["gradient_bytes"],
        "initial_val_loss": summary["initial_val_loss"],
        "final_val_loss": summary["final_val_loss"],
        "wall_s": summary["wall_s"],
        "tokens_per_s": tokens / summary["wall_s"],
        "run_bytes": run_bytes,
        "bytes_per_step": run_bytes * tokens_per_batch / tokens,  # per rank, per N batches (one sync step)
        "comm_share": summary["comm_s_per_step"] / summary["step_s_mean"] if summary["step_s_mean"] else 0.0,
        "curve": curve(job.lines, 1 if is_async else n, tokens_per_batch),
    }
    if is_async:
        row.update({k: summary[k] for k in ("updates", "staleness_mean", "staleness_histogram", "dropped_gradients",
                                            "server_busy_share", "gradients_per_worker", "ps_ranks")})
    return row


def add_ratios(rows: list[dict]) -> None:
    """Each row against the sync row of its rate: bytes (sync / row), time and loss (row / sync), reach."""
    sync = next((r for r in rows if r["mode"] == "sync"), None)
    for row in rows:
        if sync is None:
            row.update(bytes_fewer=None, time_ratio=None, loss_ratio=None, reach_s=None, reach_share=None)
            continue
        row["bytes_fewer"] = sync["bytes_per_step"] / row["bytes_per_step"] if row["bytes_per_step"] else math.inf
        row["loss_ratio"] = row["final_val_loss"] / sync["final_val_loss"]
        row["reach_s"] = _reach(row, sync)
        # time and reach: paired with sync's run of the same repeat (back to back, under the same load)
        own, sync_runs = row.get("by_repeat", {0: row}), sync.get("by_repeat", {0: sync})
        pairs = [(own[k], sync_runs[k]) for k in own if k in sync_runs] or [(row, sync)]
        row["time_ratio"] = statistics.median(r["wall_s"] / s["wall_s"] for r, s in pairs)
        reaches = [_reach(r, s) for r, s in pairs]
        shares = [t / _end(s) if t is not None else math.inf for t, (_, s) in zip(reaches, pairs)]
        row["reach_share"] = statistics.median(shares)
        if math.isinf(row["reach_share"]):
            row["reach_share"] = None  # never, in most repeats


def _reach(run: dict, sync: dict) -> float | None:
    """When ``run``'s curve reaches ``sync``'s final val loss, as printed (4 decimals) like every
    point of the curves."""
    return reach_time(run["curve"], sync["curve"][-1]["val_loss"] if sync["curve"] else sync["final_val_loss"])


def _end(sync: dict) -> float:
    return sync["curve"][-1]["t_s"] if sync["curve"] else sync["wall_s"]


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'mode':<12} {'tokens':>10} {'val loss':>8} {'wall s':>7} {'tokens/s':>9} {'MB/step':>8} {'staleness':>9} "
             f"{'bytes':>9} {'time':>6} {'loss':>6} {'reach':>6}",
             f"{'':<12} {'':>10} {'':>8} {'':>7} {'':>9} {'per rank':>8} {'(async)':>9} "
             f"{'x fewer':>9} {'/sync':>6} {'/sync':>6} {'/sync':>6}"]
    for r in rows:
        stale = f"{r['staleness_mean']:.2f}" + (f" -{r['dropped_gradients']}" if r["dropped_gradients"] else "") \
            if "staleness_mean" in r else "-"
        fewer = "-" if r["bytes_fewer"] is None else ("inf" if math.isinf(r["bytes_fewer"]) else f"{r['bytes_fewer']:.1f}")
        lines.append(f"{r['mode']:<12} {r['tokens']:>10,} {r['final_val_loss']:>8.4f} {r['wall_s']:>7.1f} "
                     f"{r['tokens_per_s']:>9,.0f} {r['bytes_per_step'] / 1e6:>8.3f} {stale:>9} {fewer:>9} "
                     f"{_fmt(r['time_ratio'], '.2f'):>6} {_fmt(r['loss_ratio'], '.3f'):>6} "
                     f"{_fmt(r['reach_share'], '.2f', 'never'):>6}")
    return "\n".join(lines)


def target_lines(rows: list[dict], slowed: bool) -> list[str]:
    """Issue #13's targets, for the rows measured here."""
    out = []
    by_mode = {r["mode"]: r for r in rows}
    if "sync" not in by_mode:
        return out
    if (d := by_mode.get(DILOCO_TARGET["mode"])) is not None:
        ok_bytes = d["bytes_fewer"] >= DILOCO_TARGET["bytes_fewer"] * (1 - 1e-9)  # exactly 50x is 50x
        ok_loss = d["loss_ratio"] <= DILOCO_TARGET["loss_ratio"]
        ok_reach = d["reach_share"] is not None and d["reach_share"] <= DILOCO_TARGET["reach_share"]
        out.append(f"diloco-50: {d['bytes_fewer']:.1f}x fewer bytes than sync ({'met' if ok_bytes else 'MISSED'}: >= 50x), "
                   f"val loss {d['loss_ratio']:.3f} x sync's ({'met' if ok_loss else 'MISSED'}: <= 1.03), "
                   f"sync's final val loss reached at {_fmt(d['reach_share'], '.2f', 'never')} of sync's time "
                   f"({'met' if ok_reach else 'MISSED'}: <= 0.5, the target at 100mbit)")
    for a in (r for r in rows if slowed and r["sync"] == ASYNC_TARGET["mode"]):  # async and every async-psK
        sooner = 1 / a["time_ratio"]
        ok_time, ok_loss = sooner >= ASYNC_TARGET["sooner"], a["loss_ratio"] <= ASYNC_TARGET["loss_ratio"]
        out.append(f"{a['mode']}, one rank slowed: finished the budget {sooner:.2f}x as fast as sync "
                   f"({'met' if ok_time else 'MISSED'}: >= 1.3x), val loss {a['loss_ratio']:.3f} x sync's "
                   f"({'met' if ok_loss else 'MISSED'}: <= 1.05)")
    return out


def plot(path: str, by_link: dict[str, list[dict]], title: str) -> None:
    plt = pyplot()
    links = list(by_link)
    fig, axes = plt.subplots(1, len(links), figsize=(6.5 * len(links), 4.8), squeeze=False)
    names = list(dict.fromkeys(r["mode"] for rows in by_link.values() for r in rows))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    for ax, link in zip(axes[0], links):
        rows = by_link[link]
        if not rows:
            continue
        finals = [r["final_val_loss"] for r in rows]
        for r in rows:
            t = [p["t_s"] for p in r["curve"]]
            loss = [p["val_loss"] for p in r["curve"]]
            ax.plot(t, loss, "o-", ms=3, lw=1.4, color=colors[r["mode"]],
                    label=f"{r['mode']} ({r['bytes_per_step'] / 1e6:.3g} MB/step)")
        sync = next((r for r in rows if r["mode"] == "sync"), None)
        if sync is not None:
            ax.axhline(sync["final_val_loss"], color="0.4", ls="--", lw=0.8, label="sync's final val loss")
        # the end of training, where the rows differ; the first evaluations are far above
        ax.set_ylim(min(finals) - 0.05 * abs(min(finals)), min(max(p["val_loss"] for r in rows for p in r["curve"]),
                                                               1.3 * max(finals)))
        ax.set_xlabel("wall time since training started (s)")
        ax.set_ylabel("val loss")
        ax.set_title(f"{title}, link {link}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- the bench
def _cluster_nodes() -> cluster.Cluster:
    try:
        cluster.need_root()
        return cluster.load(cluster.cluster_name())
    except cluster.ClusterError as err:
        raise UsageError(f"--cluster: {err}") from None


def parse_links(text: str | None, nodes: cluster.Cluster | None) -> list[str]:
    if text is None:
        return [nodes.rate if nodes is not None else "local"]
    if nodes is None:
        raise UsageError(f"--link {text}: only with --cluster (locally there is no link to shape)")
    links = [r.strip() for r in text.split(",") if r.strip()]
    if not links or len(set(links)) != len(links):
        raise UsageError(f"--link {text}: expected distinct tc rates, comma-separated, e.g. 100mbit,1gbit")
    for rate in links:
        try:
            cluster.rate_bits(rate)
        except cluster.ClusterError as err:
            raise UsageError(str(err)) from None
    return links


def code_version() -> dict:
    """The commit the runs used, and the tracked files that differed from it (a shared tree changes)."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        changed = subprocess.run(["git", "-C", str(repo), "diff", "--name-only", "HEAD"], capture_output=True, text=True,
                                 timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"commit": head.stdout.strip(), "modified": changed.stdout.split()}


def set_link(nodes: cluster.Cluster, rate: str) -> None:
    for node in nodes.nodes:
        _cluster_cli("link", node.name, "--rate", rate)


def run(args) -> dict:
    if world.size() > 1:
        raise UsageError("sync-modes launches its own jobs: run it as one process (python -m mpilm.bench sync-modes ...), "
                         "not under mpirun -np N")
    modes = parse_modes(args.modes)
    nodes = _cluster_nodes() if args.cluster else None
    links = parse_links(args.link, nodes)
    if nodes is not None:
        # async's servers: slots beyond the N ranks
        extra = max([m.ps_ranks for m in modes if m.sync == "async"], default=0)
        slots = nodes.nodes[0].slots * len(nodes.nodes)
        try:
            n = cluster.launch_plan(nodes, args.np if args.np is not None else max(1, slots - extra), None)[0]
            cluster.launch_plan(nodes, n + extra, None)
        except cluster.ClusterError as err:
            raise UsageError(f"--np: {err}" + (f" (async rows run N + K ranks: N workers and K parameter servers; "
                                               f"bring the cluster up with {extra} node(s) more)" if extra else "")) from None
    else:
        n = 2 if args.np is None else args.np
        if n < 1:
            raise UsageError(f"--np {n}: must be >= 1")
    train_args = _train_args(args.train_args)
    cfg = _check(args, modes, train_args, n)
    for option, path in (("--json", args.json_path), ("--plot", args.plot)):
        if path and not Path(path).expanduser().resolve().parent.is_dir():
            raise UsageError(f"{option} {path}: its directory does not exist")
    launcher = None if nodes is not None else _launcher(args.mpirun)
    tokens_per_batch = cfg.tokens_per_step_per_rank

    keep = args.out is not None
    root = Path(args.out).expanduser().resolve() if keep else Path(tempfile.mkdtemp(prefix="mpilm-sync-modes-"))
    root.mkdir(parents=True, exist_ok=True)
    where = (f"emulated cluster {nodes.name} ({len(nodes.nodes)} nodes), links {','.join(links)}" if nodes is not None
             else f"this machine, {launcher}")
    slow = f", rank {args.slow_rank} slowed {args.slow_factor:g}x" if args.slow_rank >= 0 else ""
    servers = " or ".join(str(k) for k in sorted({m.ps_ranks for m in modes if m.sync == "async"})) or "1"
    print(f"# mpilm sync-modes: {n} ranks on {where}{slow}; budget {args.steps} sync steps = {args.steps * n} batches of "
          f"{tokens_per_batch} tokens ({args.steps * n * tokens_per_batch:,} tokens); async: {n} workers + {servers} server rank(s), "
          f"{async_steps(args.steps, n)} gradients in all; evaluations every {args.eval_every * n * tokens_per_batch:,} tokens; "
          f"{args.repeat} repeat(s)", flush=True)
    print(f"# train options (every row): {' '.join([*_CHILD_DEFAULTS, *train_args])}", flush=True)
    runs: dict[str, dict[str, list[dict]]] = {link: {m.name: [] for m in modes} for link in links}
    failures: dict[str, dict[str, str]] = {}  # link -> row -> why
    code = code_version()  # when the runs start: the tree may change while they run
    completed = False
    try:
        for rep in range(args.repeat):
            for link in links:  # every rate's rows back to back, so they share the machine's load
                if nodes is not None:
                    set_link(nodes, link)
                for mode in modes:
                    name = f"{link}-{mode.name}-r{rep}"
                    out = root / name
                    shutil.rmtree(out, ignore_errors=True)
                    train = [sys.executable, "-m", "mpilm.train", *_CHILD_DEFAULTS, *train_args,
                             *mode_args(mode, args, n, cfg), "--out", str(out)]
                    ranks = ranks_for(mode, n)
                    cmd = ([sys.executable, "-m", "mpilm.cluster", "run", "-np", str(ranks), "--", *train]
                           if nodes is not None else [launcher, "-np", str(ranks), *train])
                    job = launch(cmd, root / f"{name}.log", args.timeout, nodes)
                    if job.returncode != 0:  # the other rows still run; the bench exits 1 at the end
                        tail = "\n".join(text for _, text in job.lines[-30:])
                        why = f"took longer than --timeout {args.timeout:g}s" if job.timed_out else f"failed (exit {job.returncode})"
                        failures.setdefault(link, {})[mode.name] = f"{why}; its output is in {root / name}.log"
                        print(f"# {link} {mode.name}: {why}; the last lines of {root / name}.log:\n{tail}",
                              file=sys.stderr, flush=True)
                        continue
                    row = run_row(mode, json.loads((out / "summary.json").read_text()), job, n, tokens_per_batch)
                    row.update(link=link, repeat=rep, command=cmd, out=str(out))
                    runs[link][mode.name].append(row)
                    print(f"# {link} {mode.name} ({rep + 1}/{args.repeat}): val loss {row['final_val_loss']:.4f}, "
                          f"{row['wall_s']:.1f} s, {row['bytes_per_step'] / 1e6:.3f} MB/step", flush=True)
        completed = True
    finally:
        if nodes is not None:
            set_link(nodes, nodes.rate)  # the cluster's own rate back
        if not keep and completed and not failures:
            shutil.rmtree(root, ignore_errors=True)
        elif not keep:
            print(f"# the runs' outputs and logs are kept in {root}", file=sys.stderr, flush=True)

    by_link = {}
    for link in links:
        rows = []
        for mode in modes:
            tries = sorted(runs[link][mode.name], key=lambda r: r["wall_s"])
            if not tries:
                continue
            row = dict(tries[(len(tries) - 1) // 2])  # the median run by wall time
            row["by_repeat"] = {r["repeat"]: {"wall_s": r["wall_s"], "final_val_loss": r["final_val_loss"],
                                              "curve": r["curve"]} for r in runs[link][mode.name]}
            rows.append(row)
        add_ratios(rows)
        by_link[link] = rows
        print(f"\n## link {link}: {n} ranks{slow}")
        print(format_rows(rows))
        for name, why in failures.get(link, {}).items():
            print(f"{name:<12} failed: {why}")
        for line in target_lines(rows, args.slow_rank >= 0):
            print(f"# target: {line}")
    result = {"world_size": n, "cluster": {"name": nodes.name, "nodes": len(nodes.nodes)} if nodes is not None else None,
              "links": links, "steps": args.steps, "async_steps": async_steps(args.steps, n),
              "eval_every": args.eval_every, "tokens_per_batch": tokens_per_batch, "slow_rank": args.slow_rank,
              "slow_factor": args.slow_factor, "repeat": args.repeat, "train_args": [*_CHILD_DEFAULTS, *train_args],
              "modes": [m.name for m in modes], "rows": by_link, "failures": failures, "code": code,
              "all_runs": {link: {m: [{k: v for k, v in r.items() if k != "curve"} for r in rs] for m, rs in per.items()}
                           for link, per in runs.items()}}
    if args.json_path:
        Path(args.json_path).expanduser().write_text(json.dumps(result, indent=1) + "\n")
        print(f"# wrote {args.json_path}")
    if args.plot:
        plot(args.plot, by_link, f"{n} ranks{slow}")
        print(f"# wrote {args.plot}")
    if failures:
        raise SystemExit(1)
    return result
