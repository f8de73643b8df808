"""``mpirun -np N python -m mpilm.bench convergence [-- TRAIN OPTIONS]``: what compression costs in loss.

The same small GPT, seed, batches and steps, trained once per variant inside the same ``mpirun``
job, one after another. Two families (``--variants`` picks runs, or ``sgd`` / ``adamw`` for a
whole family):
- ``sgd``: momentum SGD, the setting top-k with error feedback was designed for (DGC): ``none``,
  ``fp16``, and ``topk`` at densities 10%, 1% and 0.1%, each with and without error feedback.
- ``adamw``: the trainer's default optimizer (lr 2e-3, clip 1): dense ``adamw-none`` and top-k
  at 1% under each ``--topk-adam`` variant (how AdamW meets the sparse sum: ``plain`` with and
  without error feedback, ``frozen``, ``precondition``, ``precondition-momentum``), then
  ``--compress sign`` (1 bit per element of each rank's Adam update, with error feedback): as
  shipped (a scale per 2048 elements, the update times sqrt(ranks)), without the sqrt(ranks)
  gain, and with one scale per bucket.
For each run: final validation loss and its ratio to its family's dense run (``none`` or
``adamw-none``), bytes this rank handed to MPI per step (measured by the collectives and
compressors, averaged over ranks; and the reduction against the dense run), and the comm and
compress time per step. ``--plot`` draws every run's training-loss curve, one panel per family.

Every run goes through ``mpilm.train.run``, so what is measured is exactly what a user gets.
Options after ``--`` go to every run (e.g. ``-- --model lstm --steps 500``); the bench's own
defaults (the trainer's 4-layer, 128-wide GPT, batch 16 x 128; 200 steps; SGD at lr 0.1, or
AdamW's defaults; ``--allreduce ring``, so that dense bytes go through MPI and are counted, not
through node shared memory) come first, so those options win.
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
# every top-k run warms its density up from 25% over the first 30 steps. Under AdamW see ADAMW_VARIANTS.
_EF = ["--compress", "topk", "--momentum-correction", "--topk-warmup-steps", "30"]
_NOEF = ["--compress", "topk", "--no-error-feedback", "--topk-warmup-steps", "30"]
SGD_VARIANTS = {
    "none": [],
    "fp16": ["--compress", "fp16"],
    "topk-10%": [*_EF, "--topk-ratio", "0.1"],
    "topk-10%-noef": [*_NOEF, "--topk-ratio", "0.1"],
    "topk-1%": [*_EF, "--topk-ratio", "0.01"],
    "topk-1%-noef": [*_NOEF, "--topk-ratio", "0.01"],
    "topk-0.1%": [*_EF, "--topk-ratio", "0.001"],
    "topk-0.1%-noef": [*_NOEF, "--topk-ratio", "0.001"],
}
# AdamW as the trainer runs it by default (undoing the SGD settings of DEFAULT_TRAIN), top-k at 1%
# under each --topk-adam variant with its defaults (--topk-adam-warmup 30: frozen's dense steps, the
# precondition variants' density warm-up); plain as it was (no warm-up), and with DGC's warm-up too.
_ADAMW = ["--optimizer", "adamw", "--lr", "2e-3", "--grad-clip", "1"]
_ADAMW_TOPK = [*_ADAMW, "--compress", "topk", "--topk-ratio", "0.01", "--topk-adam"]
ADAMW_VARIANTS = {
    "adamw-none": _ADAMW,
    "adamw-topk-plain": [*_ADAMW_TOPK, "plain"],
    "adamw-topk-plain-noef": [*_ADAMW_TOPK, "plain", "--no-error-feedback"],
    "adamw-topk-plain-warmup": [*_ADAMW_TOPK, "plain", "--topk-warmup-steps", "30"],
    "adamw-topk-frozen": [*_ADAMW_TOPK, "frozen"],
    "adamw-topk-precondition": [*_ADAMW_TOPK, "precondition"],
    "adamw-topk-precondition-momentum": [*_ADAMW_TOPK, "precondition-momentum"],  # topk's default
    "adamw-sign": [*_ADAMW, "--compress", "sign"],  # --sign-chunk 2048, updates times sqrt(ranks)
    "adamw-sign-no-sqrt-ranks": [*_ADAMW, "--compress", "sign", "--no-sign-sqrt-ranks"],
    "adamw-sign-per-bucket": [*_ADAMW, "--compress", "sign", "--sign-chunk", "0"],
}
FAMILIES = {"sgd": SGD_VARIANTS, "adamw": ADAMW_VARIANTS}
VARIANTS = {**SGD_VARIANTS, **ADAMW_VARIANTS}
DEFAULT_TRAIN = ["--steps", "200", "--eval-every", "100", "--log-every", "10", "--allreduce", "ring",
                 "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.1", "--grad-clip", "0"]


def family_of(name: str) -> str:
    return next(f for f, members in FAMILIES.items() if name in members)


def reference_of(name: str) -> str:
    """The dense run of ``name``'s family, against which its loss and bytes are compared."""
    return next(iter(FAMILIES[family_of(name)]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", default=",".join(FAMILIES),
                        help=f"comma-separated runs, from: {', '.join(VARIANTS)}; or a family: "
                             f"{', '.join(FAMILIES)} (default: both families)")
    parser.add_argument("--out", default=None, help="keep each run's output under this directory (default: a temporary one)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the table rows to this JSON file")
    parser.add_argument("--plot", default=None, help="write the loss curves to this PNG")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN OPTIONS",
                        help="options for every mpilm.train run, after --")


def parse_variants(text: str) -> list[str]:
    """The runs named (families expanded), each family's dense reference first, in family order."""
    names = []
    for word in (v.strip() for v in text.split(",") if v.strip()):
        names += list(FAMILIES[word]) if word in FAMILIES else [word]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise UsageError(f"--variants {text}: unknown {', '.join(unknown) or '(empty)'}; choose from "
                         f"{', '.join(VARIANTS)} or a family ({', '.join(FAMILIES)})")
    ordered = []
    for family, members in FAMILIES.items():
        chosen = [n for n in dict.fromkeys(names) if n in members]
        if chosen:  # the reference every ratio of the family is taken against
            ordered += [reference_of(chosen[0])] + [n for n in chosen if n != reference_of(chosen[0])]
    return ordered


def _stopped(out: Path, error: UsageError, world_size: int) -> dict:
    """A summary for a run that training itself stopped (e.g. --max-bad-steps after a divergence),
    from its metrics.jsonl: no final loss; bytes averaged over the logged steps."""
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"final_val_loss": None, "stopped": str(error), "steps": logged[-1]["step"], "world_size": world_size,
            "bytes_sent_per_step": sum(r["bytes_sent"] for r in logged) / len(logged),
            "comm_s": sum(r["comm_s"] for r in logged) / len(logged) * logged[-1]["step"],
            "phases": {"compress_total": {"mean": sum(r["compress_s"] for r in logged) / len(logged)}}}


def _rows(results: dict[str, dict], curves: dict[str, list]) -> list[dict]:
    rows = []
    for name, s in results.items():
        ref = results[reference_of(name)]
        steps = max(1, s["steps"])
        finished = s["final_val_loss"] is not None and ref["final_val_loss"] is not None
        rows.append({
            "variant": name,
            "reference": reference_of(name),
            "final_val_loss": s["final_val_loss"],
            "val_loss_vs_dense": s["final_val_loss"] / ref["final_val_loss"] if finished else None,
            "stopped": s.get("stopped"),  # why training stopped this run early (None: it finished)
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
    width = max(16, *(len(r["variant"]) + 2 for r in rows))
    head = f"{'variant':<{width}}{'val loss':>10}{'vs dense':>9}{'bytes/step':>13}{'fewer':>8}{'comm ms':>9}{'compr ms':>10}"
    lines = [head]
    for r in rows:
        fewer = f"{r['bytes_reduction']:.1f}x" if r["bytes_reduction"] else "-"
        if r["stopped"] is not None:
            loss = f"{'stopped':>10}{'@' + str(r['steps']):>9}"
        else:
            ratio = r["val_loss_vs_dense"]
            loss = f"{r['final_val_loss']:>10.4f}{'-' if ratio is None else f'{ratio:.3f}':>9}"
        lines.append(f"{r['variant']:<{width}}{loss}"
                     f"{r['bytes_sent_per_step']:>13,.0f}{fewer:>8}{r['comm_ms_per_step']:>9.2f}{r['compress_ms_per_step']:>10.2f}")
    return "\n".join(lines)


def plot(path: str, rows: list[dict]) -> None:
    plt = pyplot()

    families = list(dict.fromkeys(family_of(r["variant"]) for r in rows))
    fig, axes = plt.subplots(1, len(families), figsize=(8 * len(families), 5), squeeze=False)
    for ax, family in zip(axes[0], families):
        for r in (r for r in rows if family_of(r["variant"]) == family):
            steps, losses = zip(*r["loss_curve"]) if r["loss_curve"] else ((), ())
            final = f"{r['final_val_loss']:.3f}" if r["stopped"] is None else f"stopped at step {r['steps']}"
            ax.plot(steps, losses, label=f"{r['variant']} ({final})",
                    linestyle="--" if r["variant"].endswith("noef") else "-")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over ranks)")
        ax.set_title(f"{family}: gradient compression, {rows[0]['world_size']} ranks (final val loss in brackets)")
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
                print(f"== {name}: {' '.join(VARIANTS[name]) or '(dense fp32, SGD)'}", flush=True)
            try:
                results[name] = train.run([*DEFAULT_TRAIN, *extra, *VARIANTS[name], "--out", str(out)])
            except UsageError as err:  # raised on every rank alike
                if not (out / "metrics.jsonl").is_file():
                    raise  # a usage error before training: the options are wrong, not the variant
                results[name] = _stopped(out, err, comm.Get_size())
                if rank == 0:
                    print(f"== {name} stopped: {err}", flush=True)
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
