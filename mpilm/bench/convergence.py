"""``mpirun -np N python -m mpilm.bench convergence [-- TRAIN OPTIONS]``: what compression costs in loss.

The same small GPT, seed, batches and steps, trained once per gradient compressor inside the
same ``mpirun`` job, one after another: ``none``, ``fp16``, and ``topk`` at densities 10%, 1% and
0.1%, each with and without error feedback (``--variants`` picks a subset). All runs use momentum
SGD, the setting top-k with error feedback was designed for (DGC); see ``VARIANTS``. For each run: final
validation loss (and its ratio to ``none``), bytes this rank handed to MPI per step (measured by
the collectives and compressors, averaged over ranks; and the reduction against ``none``), and the
comm and compress time per step. ``--plot`` draws every run's training-loss curve.

Every run goes through ``mpilm.train.run``, so what is measured is exactly what a user gets.
Options after ``--`` go to every run (e.g. ``-- --model lstm --steps 500``); the bench's own
defaults (the trainer's 4-layer, 128-wide GPT, batch 16 x 128; 200 steps of SGD, lr 0.1) come
first, so those options win.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from mpi4py import MPI

from mpilm import train
from mpilm.errors import UsageError
from mpilm.bench import pyplot

DESCRIPTION = "final loss and bytes moved for each gradient compressor"

# Deep Gradient Compression's setting (Lin et al. 2018): momentum SGD for every run; top-k with
# error feedback adds momentum correction (velocity, not gradient, is accumulated and sent) and
# every top-k run warms its density up from 25% over the first 30 steps. Error feedback with Adam
# is a poor match (Adam normalises away the magnitude the residual accumulates): see the README.
_EF = ["--compress", "topk", "--momentum-correction", "--topk-warmup-steps", "30"]
_NOEF = ["--compress", "topk", "--no-error-feedback", "--topk-warmup-steps", "30"]
VARIANTS = {
    "none": [],
    "fp16": ["--compress", "fp16"],
    "topk-10%": [*_EF, "--topk-ratio", "0.1"],
    "topk-10%-noef": [*_NOEF, "--topk-ratio", "0.1"],
    "topk-1%": [*_EF, "--topk-ratio", "0.01"],
    "topk-1%-noef": [*_NOEF, "--topk-ratio", "0.01"],
    "topk-0.1%": [*_EF, "--topk-ratio", "0.001"],
    "topk-0.1%-noef": [*_NOEF, "--topk-ratio", "0.001"],
}
DEFAULT_TRAIN = ["--steps", "200", "--eval-every", "100", "--log-every", "10",
                 "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.1", "--grad-clip", "0"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated runs, from: {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--out", default=None, help="keep each run's output under this directory (default: a temporary one)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the table rows to this JSON file")
    parser.add_argument("--plot", default=None, help="write the loss curves to this PNG")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN OPTIONS",
                        help="options for every mpilm.train run, after --")


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise UsageError(f"--variants {text}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(VARIANTS)}")
    if "none" not in names:
        names.insert(0, "none")  # the reference every ratio is taken against
    return names


def _rows(results: dict[str, dict], curves: dict[str, list]) -> list[dict]:
    ref = results["none"]
    rows = []
    for name, s in results.items():
        steps = max(1, s["steps"])
        rows.append({
            "variant": name,
            "final_val_loss": s["final_val_loss"],
            "val_loss_vs_none": s["final_val_loss"] / ref["final_val_loss"],
            "bytes_sent_per_step": s["bytes_sent_per_step"],
            "bytes_reduction": ref["bytes_sent_per_step"] / s["bytes_sent_per_step"] if s["bytes_sent_per_step"] else None,
            "comm_ms_per_step": 1e3 * s["comm_s"] / steps,
            # all of the compressors' arithmetic, wherever it ran (the comm thread, with overlap)
            "compress_ms_per_step": 1e3 * s["phases"].get("compress_total", {"mean": 0.0})["mean"],
            "world_size": s["world_size"],
            "steps": s["steps"],
            "loss_curve": curves[name],
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'variant':<16}{'val loss':>10}{'vs none':>9}{'bytes/step':>13}{'fewer':>8}{'comm ms':>9}{'compr ms':>10}"
    lines = [head]
    for r in rows:
        fewer = f"{r['bytes_reduction']:.1f}x" if r["bytes_reduction"] else "-"
        lines.append(f"{r['variant']:<16}{r['final_val_loss']:>10.4f}{r['val_loss_vs_none']:>9.3f}"
                     f"{r['bytes_sent_per_step']:>13,.0f}{fewer:>8}{r['comm_ms_per_step']:>9.2f}{r['compress_ms_per_step']:>10.2f}")
    return "\n".join(lines)


def plot(path: str, rows: list[dict]) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        steps, losses = zip(*r["loss_curve"]) if r["loss_curve"] else ((), ())
        ax.plot(steps, losses, label=f"{r['variant']} ({r['final_val_loss']:.3f})",
                linestyle="--" if r["variant"].endswith("noef") else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over ranks)")
    ax.set_title(f"gradient compression, {rows[0]['world_size']} ranks (final val loss in brackets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> dict:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    names = parse_variants(args.variants)
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    scratch = None
    if args.out is None:
        scratch = comm.bcast(tempfile.mkdtemp(prefix="mpilm-convergence-") if rank == 0 else None)
    base = Path(args.out or scratch)
    results, curves = {}, {}
    try:
        for name in names:
            out = base / name
            if rank == 0:
                print(f"== {name}: {' '.join(VARIANTS[name]) or '(dense fp32)'}", flush=True)
            results[name] = train.run([*DEFAULT_TRAIN, *extra, *VARIANTS[name], "--out", str(out)])
            if rank == 0:
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                curves[name] = [(row["step"], row["loss"]) for row in rows]
    finally:
        if scratch is not None and rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    if rank != 0:
        return {}
    rows = _rows(results, curves)
    print(f"\nconvergence: {rows[0]['world_size']} ranks, {rows[0]['steps']} steps each")
    print(format_table(rows))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        plot(args.plot, rows)
    return {"rows": rows}
