"""``python -m mpilm.bench scaling --np 1,2,4 [--mode weak|strong] [-- TRAIN OPTIONS]``.

Throughput, speed-up and efficiency versus the number of ranks. For every N in ``--np`` it
launches ``mpirun -np N python -m mpilm.train`` as a child job (same model, data and steps; the
options after ``--`` go to every run unchanged), reads the run's ``summary.json`` and tabulates:
tokens/s, speed-up and efficiency against the smallest N, step time, exposed comm share and busbw.

- weak scaling (default): every rank keeps ``--batch-size`` sequences, so the global batch grows
  with N; ideal is N x the tokens/s of one rank.
- strong scaling: ``--batch-size`` is the *global* batch, each rank gets ``batch / N`` (it must
  divide); ideal is the same global step done N times faster.

tokens/s is the tokens of one global step over the run's *median* step time (a few steps stalled
by other processes on a shared machine do not move it; the mean-based figure of each run's
summary is kept in the JSON). Speed-up = tokens/s(N) / tokens/s(N0) for the smallest N0 measured;
efficiency = speed-up x N0 / N (for strong scaling tokens per step are fixed, so this is also the
step-time ratio). With ``--repeat R`` the N values are run in turn R times (so they share the
machine's drifting load) and the median over runs is reported. ``--json`` writes the rows, ``--plot`` a PNG with throughput and
efficiency vs N and each N's phases as stacked bars.

Design and limits: this is a *launcher*. It must run as a single process (``python -m
mpilm.bench scaling``, not under ``mpirun -np >1``); it starts each child job with the MPI
environment variables of any enclosing launch removed, so the nested ``mpirun`` starts a fresh
job. Inside a batch allocation point ``--mpirun`` at the site launcher (e.g. ``srun``), which must
accept ``-np N`` or ``-n N`` (see ``--np-flag``). Each child job is killed (its process group)
after ``--timeout`` seconds. On a machine with fewer cores than ranks the runs are
oversubscribed and the numbers say so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mpilm import config
from mpilm.comm import world
from mpilm.errors import UsageError
from mpilm.bench import pyplot

DESCRIPTION = "throughput, speed-up and efficiency vs number of ranks"

# variables an enclosing MPI/PMI launch leaves behind; a nested mpirun must not see them
_LAUNCH_ENV_PREFIXES = ("PMI_", "PMIX_", "HYDRA", "MPI_LOCAL", "OMPI_COMM_WORLD", "MPIR_")
# options the bench sets per run itself
_OWNED = ("--batch-size", "--steps", "--out")
# quieter defaults for the child runs; anything after -- overrides them
_CHILD_DEFAULTS = ["--eval-batches", "2", "--eval-every", "1000000"]
PHASE_ORDER = ("data", "forward", "backward", "compress", "comm", "optimizer", "other")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--np", dest="np_list", default="1,2", help="comma-separated rank counts (default %(default)s)")
    parser.add_argument("--mode", choices=("weak", "strong"), default="weak",
                        help="weak: --batch-size per rank; strong: --batch-size is the global batch (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="sequences per rank (weak) or per global step (strong) (default %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run; the first is warm-up (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=1, help="run every N this many times, in turn; report medians (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a run is killed (default %(default)s)")
    parser.add_argument("--mpirun", default=None, help="launcher (default: mpirun next to this python, else on PATH)")
    parser.add_argument("--np-flag", default="-np", help="the launcher's rank-count flag (default %(default)s; srun: -n)")
    parser.add_argument("--out", default=None, help="keep each run's output under this directory (default: a temporary one, removed)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the rows to this JSON file")
    parser.add_argument("--plot", default=None, help="write throughput/efficiency and phase bars to this PNG")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN OPTIONS",
                        help="options for mpilm.train, after --")


def parse_np_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--np {text}: expected comma-separated whole numbers like 1,2,4") from None
    if not values or min(values) < 1:
        raise UsageError(f"--np {text}: expected rank counts >= 1")
    if len(set(values)) != len(values):
        raise UsageError(f"--np {text}: a rank count is listed twice")
    return sorted(values)


def per_rank_batch(mode: str, batch: int, n: int) -> int:
    """Sequences per rank for N ranks; strong scaling splits the global batch evenly or refuses."""
    if mode == "weak":
        return batch
    if batch % n:
        raise UsageError(f"--mode strong --batch-size {batch}: not divisible by {n} ranks; "
                         "pick a global batch that every --np value divides")
    return batch // n


def _train_args(raw: list[str]) -> list[str]:
    args = raw[1:] if raw[:1] == ["--"] else list(raw)
    for arg in args:
        if arg.split("=")[0] in _OWNED:
            raise UsageError(f"{arg.split('=')[0]} after --: set by the scaling bench (use its own --batch-size/"
                             "--steps; per-run outputs go under --out)")
    config.parse([*_CHILD_DEFAULTS, *args, "--out", "unused"], quiet=True)  # fail now, not in the first child
    return args


def _launcher(choice: str | None) -> str:
    if choice:
        found = shutil.which(choice)
        if not found:
            raise UsageError(f"--mpirun {choice}: not found")
        return found
    beside = Path(sys.executable).parent / "mpirun"
    found = str(beside) if beside.exists() else shutil.which("mpirun")
    if not found:
        raise UsageError("no mpirun next to this python or on PATH; pass --mpirun")
    return found


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_ENV_PREFIXES)}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def launch_train(launcher: str, np_flag: str, n: int, args: list[str], out: Path, timeout: float) -> dict:
    """Run one training job of n ranks; return its summary.json. Kills the job on timeout."""
    cmd = [launcher, np_flag, str(n), sys.executable, "-m", "mpilm.train", *args, "--out", str(out)]
    # own process group, so a timeout takes down mpirun and every rank it started
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_child_env(), start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)  # blocks until the child job ends
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"scaling: the run at {n} ranks took longer than --timeout {timeout:g}s and was killed")
    if proc.returncode != 0:
        errors = [line[len("error: "):] for line in output.splitlines() if line.startswith("error: ")]
        if proc.returncode == 2 and errors:
            raise UsageError(f"mpilm.train at {n} ranks: {errors[0]}")
        tail = "\n".join(output.splitlines()[-30:])
        raise RuntimeError(f"scaling: the run at {n} ranks failed (exit {proc.returncode}):\n{tail}")
    return json.loads((out / "summary.json").read_text())


def median_step_throughput(summary: dict, tokens_per_step: int) -> float:
    """Tokens/s at the run's median step time: robust to a few steps stalled by other processes."""
    return tokens_per_step / summary["phases"]["step"]["p50"]


def rows_from_summaries(runs: dict[int, list[dict]], batches: dict[int, int], block_size: int) -> list[dict]:
    """One row per N from its runs' summaries (medians over repeats); speed-up vs the smallest N."""
    rows = []
    for n in sorted(runs):
        summaries = runs[n]
        tokens_per_step = batches[n] * block_size * n
        throughputs = [median_step_throughput(s, tokens_per_step) for s in summaries]
        pick = sorted(summaries, key=lambda s: median_step_throughput(s, tokens_per_step))[(len(summaries) - 1) // 2]
        phases = pick["phases"]  # the median run's
        rows.append({
            "world_size": n,
            "batch_per_rank": batches[n],
            "tokens_per_step": tokens_per_step,
            "tokens_per_s": statistics.median(throughputs),
            "tokens_per_s_per_rank": statistics.median(throughputs) / n,
            "tokens_per_s_runs": throughputs,
            "tokens_per_s_mean_step_runs": [s["tokens_per_s"] for s in summaries],
            "step_ms": phases["step"]["p50"] * 1e3,
            "comm_share": phases.get("comm", {}).get("share", 0.0),
            "comm_total_share": phases.get("comm_total", {}).get("share", 0.0),
            "busbw_gbps": pick.get("busbw_gbps"),
            "mfu": pick.get("mfu"),
            "phases_ms": {name: phases[name]["mean"] * 1e3 for name in PHASE_ORDER if name in phases},
        })
    base = rows[0]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["efficiency"] = row["speedup"] * base["world_size"] / row["world_size"]
    return rows


def format_rows(rows: list[dict], mode: str) -> str:
    lines = [f"{'N':>5} {'batch/rank':>10} {'tokens/s':>12} {'speed-up':>9} {'efficiency':>10} "
             f"{'p50 step ms':>12} {'comm':>6} {'busbw GB/s':>10}"]
    for r in rows:
        busbw = f"{r['busbw_gbps']:10.3f}" if r["busbw_gbps"] is not None else f"{'-':>10}"
        lines.append(f"{r['world_size']:>5} {r['batch_per_rank']:>10} {r['tokens_per_s']:>12,.0f} "
                     f"{r['speedup']:>9.2f} {r['efficiency']:>10.1%} {r['step_ms']:>12.1f} {r['comm_share']:>6.1%} {busbw}")
    return "\n".join(lines)


def plot(path: str, rows: list[dict], mode: str) -> None:
    plt = pyplot()

    ns = [r["world_size"] for r in rows]
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 4.5))
    base = rows[0]
    ax.plot(ns, [r["tokens_per_s"] for r in rows], "o-", label="measured tokens/s")
    ax.plot(ns, [base["tokens_per_s"] * n / base["world_size"] for n in ns], "k--", alpha=0.5, label="ideal")
    ax.set_xlabel("ranks")
    ax.set_ylabel("tokens/s")
    ax.set_xticks(ns)
    eff = ax.twinx()
    eff.plot(ns, [r["efficiency"] * 100 for r in rows], "s:", color="tab:red", label="efficiency")
    eff.set_ylabel("efficiency (%)", color="tab:red")
    eff.set_ylim(0, max(110, 110 * max(r["efficiency"] for r in rows)))
    handles = ax.get_legend_handles_labels()[0] + eff.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left")
    ax.set_title(f"{mode} scaling")
    ax.grid(True, alpha=0.3)
    bottom = [0.0] * len(rows)
    x = list(range(len(rows)))
    for name in PHASE_ORDER:
        heights = [r["phases_ms"].get(name, 0.0) for r in rows]
        if any(heights):
            bars.bar(x, heights, bottom=bottom, label=name)
            bottom = [b + h for b, h in zip(bottom, heights)]
    bars.set_xticks(x, [str(n) for n in ns])
    bars.set_xlabel("ranks")
    bars.set_ylabel("mean step time (ms)")
    bars.set_title("where a step's time goes (rank 0)")
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> dict:
    if world.size() > 1:
        raise UsageError("scaling launches its own mpirun jobs: run it as one process "
                         "(python -m mpilm.bench scaling ...), not under mpirun -np N")
    ns = parse_np_list(args.np_list)
    if args.steps < 2:
        raise UsageError(f"--steps {args.steps}: must be >= 2 (the first step is warm-up)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.repeat < 1:
        raise UsageError(f"--repeat {args.repeat}: must be >= 1")
    if not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout}: must be > 0")
    batches = {n: per_rank_batch(args.mode, args.batch_size, n) for n in ns}
    train_args = _train_args(args.train_args)
    block_size = config.parse([*train_args, "--out", "unused"], quiet=True).block_size
    launcher = _launcher(args.mpirun)
    for option, path in (("--json", args.json_path), ("--plot", args.plot)):
        if path and not Path(path).expanduser().resolve().parent.is_dir():
            raise UsageError(f"{option} {path}: its directory does not exist")

    keep = args.out is not None
    root = Path(args.out).expanduser() if keep else Path(tempfile.mkdtemp(prefix="mpilm-scaling-"))
    print(f"# mpilm scaling: {args.mode}, ranks {','.join(map(str, ns))}, {args.steps} steps per run, "
          f"{args.repeat} repeat(s), launcher {launcher}", flush=True)
    print(f"# train options: {' '.join(train_args) or '(defaults)'}", flush=True)
    runs: dict[int, list[dict]] = {n: [] for n in ns}
    try:
        for rep in range(args.repeat):
            for n in ns:  # in turn, so every N sees the same drift in machine load
                child = [*_CHILD_DEFAULTS, "--log-every", str(args.steps), *train_args,
                         "--batch-size", str(batches[n]), "--steps", str(args.steps)]
                summary = launch_train(launcher, args.np_flag, n, child, root / f"np{n}-r{rep}", args.timeout)
                runs[n].append(summary)
                tokens_per_step = batches[n] * block_size * n
                print(f"# np {n} run {rep + 1}/{args.repeat}: {median_step_throughput(summary, tokens_per_step):,.0f} tok/s "
                      f"at the median step ({summary['tokens_per_s']:,.0f} at the mean)", flush=True)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    rows = rows_from_summaries(runs, batches, block_size)
    print(format_rows(rows, args.mode))
    result = {"mode": args.mode, "steps": args.steps, "repeat": args.repeat, "train_args": train_args, "rows": rows}
    if args.json_path:
        Path(args.json_path).expanduser().write_text(json.dumps(result, indent=1) + "\n")
        print(f"# wrote {args.json_path}")
    if args.plot:
        plot(args.plot, rows, args.mode)
        print(f"# wrote {args.plot}")
    return result
