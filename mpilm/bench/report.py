"""``python -m mpilm.bench report RUN_DIR [RUN_DIR ...] [--json PATH] [--plot PATH]``.

One table for a scaling sweep whose runs were launched elsewhere (a batch script, a Slurm job
array, by hand): each RUN_DIR is a ``mpilm.train`` output directory, read from its
``summary.json`` and ``config.json``. One row per rank count: ranks, nodes (as the run's banner
counted them; ``-`` for runs written before the trainer recorded it), tokens/s, speed-up and
efficiency against the smallest rank count, exposed comm share of a step, MFU (GPUs in
``mpilm.metrics``' table only) and the final validation loss.

Does: decide from the configurations whether the runs are a weak sweep (the same sequences per
rank per step: ideal tokens/s grows with N) or a strong one (the same global batch: ideal step
time shrinks with N), and say so; refuse runs of different models (comparing them means
nothing) and a mix that is neither kind. Several runs at one rank count (repeats) count at their
median, as ``bench scaling --repeat`` does. The rows, speed-ups and figure are
``mpilm.bench.scaling``'s own (``rows_from_summaries``, ``plot``): tokens/s at each run's median
step, speed-up = tokens/s(N) / tokens/s(N0), efficiency = speed-up x N0 / N.

Writes: the table on stdout, the rows as JSON and the figure as PNG (throughput and efficiency
vs N, each N's phases as stacked bars), by default beside the runs (``scaling-report.json`` and
``.png`` in their deepest common directory).

Does not: launch anything (``bench scaling`` does, on one machine); talk MPI (run it as one
process). Limits: a run must have at least 2 steps (the first is warm-up and never timed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from mpilm.bench import scaling
from mpilm.comm import world
from mpilm.errors import UsageError

DESCRIPTION = "one scaling table, JSON and PNG from finished training runs' output directories"

# what a run trains: runs that differ in any of these are not points of one sweep
MODEL_KEYS = ("model", "n_layer", "n_head", "n_embd", "block_size")
REPORT_NAME = "scaling-report"
KIND_WORDS = {"weak": "weak scaling (batch per rank fixed)", "strong": "strong scaling (global batch fixed)",
              "single": "one rank count (nothing to scale)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="mpilm.train output directories (each with summary.json and config.json)")
    parser.add_argument("--json", dest="json_path", default=None,
                        help=f"write the rows here (default: {REPORT_NAME}.json in the runs' common directory)")
    parser.add_argument("--plot", default=None,
                        help=f"write the figure here (default: {REPORT_NAME}.png in the runs' common directory)")


def read_run(run_dir: str) -> dict:
    """``{"dir", "summary", "config"}`` of one finished run; UsageError naming what is missing."""
    path = Path(run_dir).expanduser()
    found = {}
    for name in ("summary", "config"):
        file = path / f"{name}.json"
        if not file.is_file():
            why = "the run did not finish" if name == "summary" else "not a mpilm.train output directory"
            raise UsageError(f"{run_dir}: no {name}.json ({why})")
        try:
            found[name] = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UsageError(f"{file}: not valid JSON ({err})") from None
    summary, cfg = found["summary"], found["config"]
    missing = [k for k in ("world_size", "batch_size", "grad_accum", *MODEL_KEYS) if k not in cfg]
    if missing or "world_size" not in summary or "final_val_loss" not in summary:
        raise UsageError(f"{run_dir}: summary.json / config.json lack {', '.join(missing) or 'the run figures'} "
                         "(not written by mpilm.train)")
    if "step" not in summary.get("phases", {}):
        raise UsageError(f"{run_dir}: no timed step (the run had {summary.get('steps', '?')} step(s) and the first is "
                         "warm-up: run at least 2)")
    return {"dir": str(path), "summary": summary, "config": cfg}


def sweep_kind(runs: list[dict]) -> str:
    """``weak``, ``strong``, or ``single`` (one rank count); UsageError for other mixes or models."""
    for key in MODEL_KEYS:
        values = {r["config"][key] for r in runs}
        if len(values) > 1:
            raise UsageError(f"the runs train different models ({key}: {', '.join(map(str, sorted(values)))}): "
                             "report one sweep at a time")
    per_rank = {r["config"]["batch_size"] * r["config"]["grad_accum"] for r in runs}
    per_step = {r["config"]["batch_size"] * r["config"]["grad_accum"] * r["config"]["world_size"] for r in runs}
    ranks = {r["config"]["world_size"] for r in runs}
    if len(ranks) == 1:
        if len(per_rank) > 1:
            raise UsageError(f"the runs at {ranks.pop()} rank(s) differ in batch size x grad accumulation "
                             f"({', '.join(map(str, sorted(per_rank)))}): not repeats of one point")
        return "single"
    if len(per_rank) == 1:
        return "weak"
    if len(per_step) == 1:
        return "strong"
    raise UsageError("the runs are neither a weak sweep (the same batch size x grad accumulation per rank) nor a "
                     "strong one (the same global batch): report each sweep separately")


def report_rows(runs: list[dict]) -> list[dict]:
    """``scaling.rows_from_summaries`` over the runs, plus nodes, final val loss and run dirs per N."""
    by_n: dict[int, list[dict]] = {}
    for run in runs:
        by_n.setdefault(run["config"]["world_size"], []).append(run)
    batches = {n: group[0]["config"]["batch_size"] * group[0]["config"]["grad_accum"] for n, group in by_n.items()}
    block_size = runs[0]["config"]["block_size"]
    rows = scaling.rows_from_summaries({n: [r["summary"] for r in group] for n, group in by_n.items()},
                                       batches, block_size)
    for row in rows:
        group = by_n[row["world_size"]]
        nodes = {r["config"].get("nodes") for r in group}
        row["nodes"] = nodes.pop() if len(nodes) == 1 else None
        row["final_val_loss"] = statistics.median(r["summary"]["final_val_loss"] for r in group)
        row["run_dirs"] = [r["dir"] for r in group]
    return rows


def format_report(rows: list[dict]) -> str:
    lines = [f"{'ranks':>5} {'nodes':>5} {'batch/rank':>10} {'tokens/s':>12} {'speed-up':>9} {'efficiency':>10} "
             f"{'comm':>6} {'MFU':>6} {'val loss':>9}"]
    for r in rows:
        nodes = f"{r['nodes']:>5}" if r["nodes"] is not None else f"{'-':>5}"
        mfu = f"{r['mfu']:>6.1%}" if r["mfu"] is not None else f"{'-':>6}"
        lines.append(f"{r['world_size']:>5} {nodes} {r['batch_per_rank']:>10} {r['tokens_per_s']:>12,.0f} "
                     f"{r['speedup']:>9.2f} {r['efficiency']:>10.1%} {r['comm_share']:>6.1%} {mfu} "
                     f"{r['final_val_loss']:>9.4f}")
    return "\n".join(lines)


def run(args) -> dict:
    if world.size() > 1:
        raise UsageError("report reads finished runs: run it as one process, not under mpirun -np N")
    runs = [read_run(d) for d in args.run_dirs]
    if len({r["dir"] for r in runs}) != len(runs):
        raise UsageError("a run directory is listed twice")
    kind = sweep_kind(runs)
    common = Path(os.path.commonpath([r["dir"] for r in runs]))
    json_path = Path(args.json_path).expanduser() if args.json_path else common / f"{REPORT_NAME}.json"
    plot_path = Path(args.plot).expanduser() if args.plot else common / f"{REPORT_NAME}.png"
    for option, path in (("--json", json_path), ("--plot", plot_path)):
        if not path.resolve().parent.is_dir():
            raise UsageError(f"{option} {path}: its directory does not exist")
    rows = report_rows(runs)
    print(f"# mpilm report: {len(runs)} run(s), {KIND_WORDS[kind]}, model "
          + " ".join(f"{k}={runs[0]['config'][k]}" for k in MODEL_KEYS))
    print(format_report(rows))
    result = {"kind": kind, "model": {k: runs[0]["config"][k] for k in MODEL_KEYS}, "rows": rows}
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    scaling.plot(str(plot_path), rows, kind if kind != "single" else "single-point")  # titled "<kind> scaling"
    print(f"# wrote {json_path} and {plot_path}")
    return result
