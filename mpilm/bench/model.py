"""``python -m mpilm.bench model``: the alpha-beta cost model, fitted here, used to predict scaling.

An allreduce of n bytes over p ranks costs ``a(p) alpha + b(p, n) beta``: alpha is the latency of
one message, beta the inverse bandwidth (seconds per byte), and (a, b) count the messages and
bytes on the algorithm's critical path (p' = largest power of two <= p; "fold" = p != p'):

    ring   2(p-1) alpha + 2(p-1)/p n beta
    rhd    (2 lg p' + 2 fold) alpha + (2(p'-1)/p' n + 2 n fold) beta     (mpi is fitted in this shape)
    tree   (lg p' + 2 fold) (alpha + n beta)                             (recursive doubling)
    topk   (p-1) alpha + (p-1) 8k beta     (allgather of k (fp32 value, int32 index) pairs per rank)
    gtopk  (lg p' + 2 fold) (alpha + 8k beta)   (global top-k: k pairs per recursive-doubling round)

1. Fit: ``--from allreduce.json[,more.json]`` (rows of ``python -m mpilm.bench allreduce --json``;
   glob patterns allowed) gives, per algorithm, alpha and beta by least squares on the relative
   error (so 4 KiB and 256 MiB points count alike), non-negative. A point measured in several
   files (repeated runs) counts once, at its median time. ``--fit-np 2`` fits on those world
   sizes only; every other measured world size is then predicted from that fit and the error is
   shown (validation).
   ``--cores C`` says the measured ranks shared one node of C cores (the plain model, which
   assumes a core per rank, is fitted and shown beside). Each phase of an algorithm has busy
   ranks, those that send, receive or reduce in it: all p in the ring; in rhd, tree and mpi the
   2 rem fold-in ranks, then the p' core ranks (the folded-out ranks wait). A phase is
   synchronous, so it ends when the fullest core has run all of its busy ranks one after
   another. The kernel balances runnable ranks, ceil or floor(p/C) per core, and a waiting
   MPICH rank is runnable (it polls), so it cannot know which are busy: the busy ranks land on
   the cores at random, and the phase's alpha and beta terms are multiplied by s = the expected
   number of busy ranks on the fullest core (exact; s = ceil(p/C) when all are busy, 4/3 for 2
   busy of 3 ranks on 2 cores). A waiting rank costs its busy core-mate little: MPICH gives the
   core away (sched_yield) every MPIR_CVAR_POLLS_BEFORE_YIELD = 1000 polls.
   Ranks that share a core also hand it over for every message, which a core each never pays:
   ``--shared-core-from`` (rows of ``taskset -c 0 mpirun -np 2 python -m mpilm.bench allreduce
   --json``, every rank pinned to one core, so s = 2) gives per algorithm the seconds of such a
   core switch, by least squares on what 2 (a alpha + b beta) leaves unexplained; each phase then
   adds (s - 1) switches per message. Both are measured at np 2, like the fit, so the validation
   at other world sizes stays a prediction. Used for the fit and the validation only; the
   predictions below assume a core per rank.
2. Predict: with the compute time of one step (``--compute-ms``, or ``--from-summary`` a training
   run's summary.json, which also gives the gradient bytes and bucket size) the step time at N
   ranks is compute + the sum over gradient buckets of the allreduce time (mpilm reduces after
   backward, so nothing overlaps), and the weak-scaling efficiency is compute / step. For N = 2,
   4, ... ``--max-np`` it prints each algorithm's step time and efficiency and which one wins.
   ``--alpha 2us --bandwidth 25GB/s`` replaces the fitted numbers by a given network (one link
   model for every algorithm; either alone replaces just that one). top-k and gtop-k use the
   ring's fit (the same point-to-point links) and ``--topk-density``; like ``--compress topk``
   in training, a bucket whose sparse exchange would move more bytes than the dense ring is
   predicted as the dense ring instead.

Limits: the model has no reduction-compute (gamma) term (it is folded into beta), no
memory or NIC contention between the ranks of a node beyond the shared cores, no
segmentation/pipelining effects, and alpha is the same for every message of an algorithm, also
for the fold-in messages that np 2 never sends; top-k's selection and scatter-add cost is not
counted (measure it with ``bench compress``). The core-sharing correction is an average over
where the kernel happens to place the ranks, and a time slice (milliseconds) that runs out
mid-phase is not modelled: oversubscribed measurements are noisy, so repeat them and pass every
run to ``--from``. The validation table says how far off it is.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import re
import statistics
from pathlib import Path

import numpy as np

from mpilm.bench.allreduce import parse_bytes
from mpilm.errors import UsageError
from mpilm.bench import pyplot

DESCRIPTION = "alpha-beta cost model fitted to this machine; predicted scaling"

FITTED_SHAPES = ("ring", "rhd", "tree", "mpi")  # measured algorithms with a cost formula
PREDICTED = ("ring", "rhd", "tree", "topk", "gtopk")
SPARSE = ("topk", "gtopk")
PAIR_BYTES = 8  # one top-k entry on the wire: fp32 value + int32 index
TARGET_ERROR = 0.30

_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_RATE_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30,
               "b": 1 / 8, "Kb": 1e3 / 8, "Mb": 1e6 / 8, "Gb": 1e9 / 8, "Tb": 1e12 / 8}
_NUMBER = r"(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)"


def parse_seconds(text: str, option: str) -> float:
    """``2us``, ``1.5ms``, ``300ns``, ``2e-6`` (seconds) -> seconds."""
    match = re.fullmatch(rf"\s*{_NUMBER}\s*(s|ms|us|µs|ns)?\s*", text)
    if not match:
        raise UsageError(f"{option} {text}: expected a time like 2us, 1.5ms, 300ns or 2e-6 (seconds)")
    return float(match.group(1)) * _TIME_UNITS[match.group(2) or "s"]


def parse_rate(text: str, option: str) -> float:
    """``25GB/s``, ``100Gb/s`` (bits), ``12.5GiB/s``, ``3e9`` (bytes/s) -> bytes per second."""
    match = re.fullmatch(rf"\s*{_NUMBER}\s*(?:([KMGT]?i?[Bb])(?:/s|ps)?)?\s*", text)
    if not match or (match.group(2) and match.group(2) not in _RATE_UNITS):
        raise UsageError(f"{option} {text}: expected a bandwidth like 25GB/s, 100Gb/s, 12GiB/s or 3e9 (bytes/s)")
    rate = float(match.group(1)) * _RATE_UNITS[match.group(2) or "B"]
    if rate <= 0:
        raise UsageError(f"{option} {text}: must be > 0")
    return rate


# ---------------------------------------------------------------- the model
def cost_phases(algorithm: str, p: int, n: float) -> list[tuple[float, float, int]]:
    """(messages, bytes, busy ranks) of each phase on the critical path of one allreduce of n bytes.

    Busy ranks are those that send, receive or reduce in that phase; at a world size that is not
    a power of two the fold-in pairs (2 rem ranks) are busy in the fold phase and the p' core
    ranks in the rest, while the folded-out ranks wait. For ``topk`` and ``gtopk`` n is the
    bytes of one rank's selected pairs (8k)."""
    if p <= 1:
        return []
    p2 = 1 << (p.bit_length() - 1)
    rem = p - p2
    lg = math.log2(p2)
    fold = [(2.0, 2.0 * n, 2 * rem)] if rem else []  # fold-in and fold-out: one message of n each way
    if algorithm == "ring":
        return [(2.0 * (p - 1), 2.0 * (p - 1) / p * n, p)]
    if algorithm in ("rhd", "mpi"):
        return fold + [(2 * lg, 2.0 * (p2 - 1) / p2 * n, p2)]
    if algorithm in ("tree", "gtopk"):
        return fold + [(lg, lg * n, p2)]
    if algorithm == "topk":
        return [(float(p - 1), float(p - 1) * n, p)]
    raise ValueError(f"no cost formula for algorithm {algorithm!r}")


@functools.lru_cache(maxsize=None)
def contention(p: int, busy: int, cores: int | None) -> float:
    """How many times longer a phase with ``busy`` of its p ranks takes on ``cores`` cores.

    A phase is synchronous: it ends when the most loaded core has run all of its busy ranks. The
    kernel balances the p runnable ranks (an MPICH rank waiting for a message polls, so it is
    runnable too) to ceil or floor p/cores per core, blind to which ranks are busy, so the busy
    ones land on the cores at random; the slow-down is the expected number of busy ranks on the
    fullest core: E[max] = sum over m >= 0 of P(max > m), counted exactly. None: a core per rank."""
    if not cores or p <= cores or busy <= 1:
        return 1.0
    slots = [p // cores + (1 if c < p % cores else 0) for c in range(cores)]  # ranks per core
    placements = math.comb(p, busy)
    expected = 0.0
    for most in range(busy):
        # ways to place the busy ranks with at most `most` on every core, core by core
        ways = [1] + [0] * busy
        for size in slots:
            ways = [sum(ways[k - j] * math.comb(size, j) for j in range(min(most, size, k) + 1)) for k in range(busy + 1)]
        expected += 1 - ways[busy] / placements
    return expected


def cost_terms(algorithm: str, p: int, n: float) -> tuple[float, float]:
    """(messages, bytes) on the critical path of one allreduce of n bytes over p ranks, a core each."""
    phases = cost_phases(algorithm, p, n)
    return sum(m for m, _, _ in phases), sum(b for _, b, _ in phases)


def shared_terms(algorithm: str, p: int, n: float, cores: int | None) -> tuple[float, float, float]:
    """(messages, bytes, switches) when the p ranks share ``cores`` cores: each phase's messages and
    bytes times its ``contention`` s, and (s - 1) core switches per message (a message to a rank
    that waits behind a busy one on its core arrives after that rank gives the core away)."""
    terms = [0.0, 0.0, 0.0]
    for m, b, busy in cost_phases(algorithm, p, n):
        stretch = contention(p, busy, cores)
        terms[0] += m * stretch
        terms[1] += b * stretch
        terms[2] += m * (stretch - 1)
    return terms[0], terms[1], terms[2]


def predict_seconds(algorithm: str, p: int, n: float, alpha: float, beta: float,
                    cores: int | None = None, switch: float = 0.0) -> float:
    """Allreduce time: alpha per message, beta per byte, ``switch`` seconds per core switch."""
    a, b, w = shared_terms(algorithm, p, n, cores)
    return a * alpha + b * beta + w * switch


def fit(rows: list[dict], algorithm: str, cores: int | None = None, switch: float = 0.0) -> tuple[float, float]:
    """Non-negative (alpha, beta) minimising the squared *relative* error over ``rows``."""
    shared = np.array([shared_terms(algorithm, r["world_size"], r["size_bytes"], cores) for r in rows])
    terms, switches = shared[:, :2], shared[:, 2]
    times = np.array([r["time_us"] * 1e-6 for r in rows])
    design = terms / times[:, None]  # divide each equation by its measurement: relative error
    target = 1 - switches * switch / times  # the switch time is known: fit what is left
    solution = np.linalg.lstsq(design, target, rcond=None)[0]
    if (solution >= 0).all():
        return float(solution[0]), float(solution[1])
    # a 2-variable NNLS: the best fit with one coefficient at zero
    best = None
    for keep in (0, 1):
        column = design[:, keep]
        value = max(0.0, float(column @ target / (column @ column))) if column.any() else 0.0
        residual = float(np.sum((column * value - target) ** 2))
        if best is None or residual < best[0]:
            best = (residual, keep, value)
    _, keep, value = best
    return (value, 0.0) if keep == 0 else (0.0, value)


def fit_switch(rows: list[dict], algorithm: str, alpha: float, beta: float) -> float:
    """Seconds per core switch (>= 0), from ``rows`` measured with every rank pinned to one core,
    given the (alpha, beta) fitted with a core per rank: least squares on the relative error."""
    pinned = [(r["time_us"] * 1e-6, *shared_terms(algorithm, r["world_size"], r["size_bytes"], 1)) for r in rows]
    known = np.array([(a * alpha + b * beta) / t for t, a, b, _ in pinned])  # what alpha and beta explain
    per_switch = np.array([w / t for t, _, _, w in pinned])
    if not per_switch.any():
        return 0.0
    return max(0.0, float(per_switch @ (1 - known) / (per_switch @ per_switch)))


def bucket_sizes(gradient_bytes: int, bucket_bytes: int) -> list[int]:
    """The gradient buffer cut into buckets as GradBuffer does (in bytes; the last one smaller)."""
    full, rest = divmod(gradient_bytes, bucket_bytes)
    return [bucket_bytes] * full + ([rest] if rest else [])


def step_comm_seconds(algorithm: str, p: int, buckets: list[int], alpha: float, beta: float, density: float) -> float:
    if algorithm not in SPARSE:
        return sum(predict_seconds(algorithm, p, b, alpha, beta) for b in buckets)
    total = 0.0
    for b in buckets:
        # k entries of 4-byte gradients per bucket, each sent as an 8-byte (index, value) pair
        pairs = math.ceil(density * b / 4) * PAIR_BYTES
        if cost_terms(algorithm, p, pairs)[1] >= cost_terms("ring", p, b)[1]:
            total += predict_seconds("ring", p, b, alpha, beta)  # goes dense, as the compressor does
        else:
            total += predict_seconds(algorithm, p, pairs, alpha, beta)
    return total


# ---------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="sources", default=None,
                        help="bench allreduce JSON file(s) to fit alpha and beta on: comma-separated paths or glob "
                             "patterns; a point measured in several files (repeated runs) counts once, at its median")
    parser.add_argument("--fit-np", default=None,
                        help="fit on these world sizes only (comma-separated); the others are predicted and checked "
                             "(default: all measured)")
    parser.add_argument("--cores", type=int, default=None,
                        help="the measured ranks shared one node of this many cores: each phase takes as long as its "
                             "busy ranks on the fullest core (fit and validation; the plain model is shown beside it; "
                             "default: not modelled)")
    parser.add_argument("--shared-core-from", default=None,
                        help="with --cores: bench allreduce JSON file(s) measured with every rank pinned to one core "
                             "(taskset -c 0 mpirun -np 2 ...); they give the time of a core switch per algorithm")
    parser.add_argument("--compute-ms", type=float, default=None, help="compute time of one training step (ms)")
    parser.add_argument("--from-summary", default=None,
                        help="a training run's summary.json: compute time per step, gradient bytes (and bucket size "
                             "from the config.json beside it)")
    parser.add_argument("--grad-bytes", default=None, help="gradient bytes per step, K/M/G suffixes (overrides the summary)")
    parser.add_argument("--bucket-mb", type=float, default=None, help="gradient bucket size in MiB (default: the run's, else 25)")
    parser.add_argument("--alpha", default=None, help="message latency of a given network, e.g. 2us (overrides the fit)")
    parser.add_argument("--bandwidth", default=None, help="link bandwidth of a given network, e.g. 25GB/s (overrides the fit)")
    parser.add_argument("--topk-density", type=float, default=0.01, help="top-k: fraction of entries sent (default %(default)s)")
    parser.add_argument("--max-np", type=int, default=4096, help="predict for N = 2, 4, ... up to this (default %(default)s)")
    parser.add_argument("--json", dest="json_path", default=None, help="write fit, validation and predictions to this JSON file")
    parser.add_argument("--plot", default=None, help="write predicted efficiency vs N and predicted-vs-measured to this PNG")


def _source_paths(sources: str, option: str) -> list[Path]:
    """``--from`` entries, comma-separated, each a path or a glob pattern, in a stable order."""
    paths = []
    for entry in [s.strip() for s in sources.split(",") if s.strip()]:
        expanded = Path(entry).expanduser()
        if glob.has_magic(entry):
            matches = sorted(Path(m) for m in glob.glob(str(expanded)))
            if not matches:
                raise UsageError(f"{option} {entry}: no file matches this pattern")
            paths.extend(matches)
        elif not expanded.is_file():
            raise UsageError(f"{option} {entry}: no such file")
        else:
            paths.append(expanded)
    return paths


def _load_rows(sources: str, option: str = "--from") -> list[dict]:
    rows = []
    for path in _source_paths(sources, option):
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UsageError(f"{option} {path}: not valid JSON ({err.msg})") from None
        if not isinstance(loaded, list) or not all(
                isinstance(r, dict) and {"size_bytes", "algorithm", "world_size", "time_us"} <= r.keys() for r in loaded):
            raise UsageError(f"{option} {path}: expected the row list written by 'python -m mpilm.bench allreduce --json'")
        rows.extend(r for r in loaded if r["world_size"] > 1 and r["time_us"] > 0)
    return merge_repeats(rows)


def merge_repeats(rows: list[dict]) -> list[dict]:
    """One row per (algorithm, world size, message size): the median time of its repeats.

    On a shared machine a whole run can be slowed by something else running; the median of a
    few runs ignores such a run, where fitting every repeat would pull alpha and beta up."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["algorithm"], r["world_size"], r["size_bytes"]), []).append(r)
    return [dict(repeats[0], time_us=statistics.median(r["time_us"] for r in repeats), repeats=len(repeats))
            for repeats in groups.values()]


def _workload(args) -> dict:
    """Compute seconds per step, gradient bytes and bucket bytes, from the options and/or a summary."""
    compute = args.compute_ms / 1e3 if args.compute_ms is not None else None
    gradient_bytes = parse_bytes(args.grad_bytes, "--grad-bytes") if args.grad_bytes else None
    bucket_mb = args.bucket_mb
    if args.from_summary:
        path = Path(args.from_summary).expanduser()
        if not path.is_file():
            raise UsageError(f"--from-summary {args.from_summary}: no such file")
        try:
            summary = json.loads(path.read_text())
            if compute is None:
                compute = summary.get("compute_s_per_step")
                if compute is None:  # summaries written before run_metrics existed
                    phases = summary["phases"]
                    compute = phases["step"]["mean"] - phases["comm"]["mean"]
            gradient_bytes = gradient_bytes or summary.get("gradient_bytes")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"--from-summary {args.from_summary}: not a summary.json written by mpilm.train") from None
        config_path = path.with_name("config.json")
        if bucket_mb is None and config_path.is_file():
            bucket_mb = json.loads(config_path.read_text()).get("bucket_mb")
    if compute is None or not compute > 0:
        raise UsageError("the step's compute time is needed: pass --compute-ms MS (> 0) or --from-summary summary.json")
    if not gradient_bytes:
        raise UsageError("the gradient size is needed: pass --grad-bytes (e.g. 3.2M) or --from-summary of a recent run")
    bucket_mb = 25.0 if bucket_mb is None else bucket_mb
    if not bucket_mb > 0:
        raise UsageError(f"--bucket-mb {bucket_mb}: must be > 0")
    return {"compute_s": float(compute), "gradient_bytes": int(gradient_bytes), "bucket_bytes": int(bucket_mb * 2**20)}


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB"


def _validation(rows: list[dict], params: dict, fit_np: set[int], cores: int | None, switches: dict) -> list[dict]:
    """Per algorithm and world size: predicted vs measured, relative errors."""
    out = []
    for algorithm, (alpha, beta) in params.items():
        for p in sorted({r["world_size"] for r in rows if r["algorithm"] == algorithm}):
            mine = sorted((r for r in rows if r["algorithm"] == algorithm and r["world_size"] == p),
                          key=lambda r: r["size_bytes"])
            points = []
            for r in mine:
                predicted = predict_seconds(algorithm, p, r["size_bytes"], alpha, beta, cores,
                                            switches.get(algorithm, 0.0)) * 1e6
                points.append({"size_bytes": r["size_bytes"], "measured_us": r["time_us"], "predicted_us": predicted,
                               "rel_error": (predicted - r["time_us"]) / r["time_us"], "repeats": r.get("repeats", 1)})
            errors = [abs(q["rel_error"]) for q in points]
            out.append({"algorithm": algorithm, "world_size": p, "in_fit": p in fit_np, "points": points,
                        "median_abs_error": statistics.median(errors), "max_abs_error": max(errors)})
    return out


def _fit_all(rows: list[dict], fit_np: set[int], cores: int | None, pinned: list[dict]) -> tuple[dict, dict]:
    """(alpha, beta) per measured algorithm that has two message sizes at the fitted world sizes,
    and with ``pinned`` rows (every rank on one core) the seconds per core switch."""
    fits, switches = {}, {}
    for algorithm in FITTED_SHAPES:
        mine = [r for r in rows if r["algorithm"] == algorithm and r["world_size"] in fit_np]
        if len({r["size_bytes"] for r in mine}) < 2:
            continue
        mine_pinned = [r for r in pinned if r["algorithm"] == algorithm]
        fits[algorithm] = fit(mine, algorithm, cores)
        # fitted ranks that shared cores need the switch time and it needs alpha and beta: alternate
        # (once is exact when the fitted world sizes have a core per rank, as at --fit-np 2 on 2 cores)
        for _ in range(3 if mine_pinned else 0):
            switches[algorithm] = fit_switch(mine_pinned, algorithm, *fits[algorithm])
            fits[algorithm] = fit(mine, algorithm, cores, switches[algorithm])
    return fits, switches


def _predictions(work: dict, params: dict, density: float, max_np: int) -> list[dict]:
    buckets = bucket_sizes(work["gradient_bytes"], work["bucket_bytes"])
    rows = []
    p = 2
    while p <= max_np:
        row = {"world_size": p, "algorithms": {}}
        for algorithm, (alpha, beta) in params.items():
            comm = step_comm_seconds(algorithm, p, buckets, alpha, beta, density)
            step = work["compute_s"] + comm
            row["algorithms"][algorithm] = {"comm_ms": comm * 1e3, "step_ms": step * 1e3,
                                            "efficiency": work["compute_s"] / step}
        row["best"] = min(row["algorithms"], key=lambda a: row["algorithms"][a]["step_ms"])
        dense = [a for a in row["algorithms"] if a not in SPARSE]
        row["best_dense"] = min(dense, key=lambda a: row["algorithms"][a]["step_ms"])
        rows.append(row)
        p *= 2
    return rows


def _wins(predictions: list[dict], key: str = "best", label: str = "") -> list[str]:
    """Contiguous N ranges where each algorithm is fastest (``key``: best, or best_dense)."""
    spans = []
    for row in predictions:
        if spans and spans[-1][0] == row[key]:
            spans[-1][2] = row["world_size"]
        else:
            spans.append([row[key], row["world_size"], row["world_size"]])
    return [f"{name} wins{label} for N = {lo}" + (f" .. {hi}" if hi != lo else "") for name, lo, hi in spans]


def _plot(path: str, predictions: list[dict], validation: list[dict], title: str) -> None:
    plt = pyplot()

    panels = 2 if validation else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    ns = [r["world_size"] for r in predictions]
    for algorithm in predictions[0]["algorithms"]:
        ax.plot(ns, [r["algorithms"][algorithm]["efficiency"] * 100 for r in predictions], marker="o", ms=3, label=algorithm)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 105)
    ax.set_xlabel("ranks N")
    ax.set_ylabel("predicted weak-scaling efficiency (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if validation:
        ax = axes[0][1]
        lo, hi = math.inf, 0.0
        for i, entry in enumerate(validation):
            measured = [q["measured_us"] for q in entry["points"]]
            predicted = [q["predicted_us"] for q in entry["points"]]
            lo, hi = min(lo, *measured, *predicted), max(hi, *measured, *predicted)
            ax.scatter(measured, predicted, s=14, marker="o" if entry["in_fit"] else "x", color=plt.cm.tab20(i % 20),
                       label=f"{entry['algorithm']} N={entry['world_size']}{'' if entry['in_fit'] else ' (held out)'}")
        line = np.array([lo, hi])
        ax.plot(line, line, "k-", lw=0.8)
        ax.fill_between(line, line * (1 - TARGET_ERROR), line * (1 + TARGET_ERROR), color="gray", alpha=0.2,
                        label=f"±{TARGET_ERROR:.0%}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured allreduce time (us)")
        ax.set_ylabel("predicted (us)")
        ax.set_title("model vs measurement")
        ax.legend(fontsize=6, ncol=2)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> dict:
    from mpilm.comm import world

    say = world.say  # rank 0 prints (the model needs one process; more are harmless)
    work = _workload(args)
    if not 0 < args.topk_density <= 1:
        raise UsageError(f"--topk-density {args.topk_density}: must be in (0, 1]")
    if args.cores is not None and args.cores < 1:
        raise UsageError(f"--cores {args.cores}: must be >= 1")
    if args.max_np < 2:
        raise UsageError(f"--max-np {args.max_np}: must be >= 2")
    alpha_override = parse_seconds(args.alpha, "--alpha") if args.alpha else None
    beta_override = 1 / parse_rate(args.bandwidth, "--bandwidth") if args.bandwidth else None
    for option, path in (("--json", args.json_path), ("--plot", args.plot)):
        if path and not Path(path).expanduser().resolve().parent.is_dir():
            raise UsageError(f"{option} {path}: its directory does not exist")

    rows = _load_rows(args.sources) if args.sources else []
    if args.shared_core_from and not (args.cores and args.sources):
        raise UsageError("--shared-core-from calibrates the measured ranks' time-sharing: pass --from and --cores too")
    pinned = _load_rows(args.shared_core_from, "--shared-core-from") if args.shared_core_from else []
    if not rows and (alpha_override is None or beta_override is None):
        raise UsageError("nothing to fit and no network given: pass --from allreduce.json, or both --alpha and --bandwidth")
    measured_np = sorted({r["world_size"] for r in rows})
    if args.fit_np:
        try:
            fit_np = {int(v) for v in args.fit_np.split(",") if v.strip()}
        except ValueError:
            raise UsageError(f"--fit-np {args.fit_np}: expected comma-separated world sizes") from None
        if not fit_np & set(measured_np):
            raise UsageError(f"--fit-np {args.fit_np}: none of these world sizes is in the data ({measured_np})")
    else:
        fit_np = set(measured_np)

    fits, switches = _fit_all(rows, fit_np, args.cores, pinned)
    if rows and not fits:
        raise UsageError(f"--from {args.sources}: no algorithm among {','.join(FITTED_SHAPES)} has two message sizes "
                         f"at world sizes {sorted(fit_np)} to fit")
    if pinned and not switches:
        raise UsageError(f"--shared-core-from {args.shared_core_from}: no rows of the fitted algorithms ({','.join(fits)})")
    validation = _validation(rows, fits, fit_np, args.cores, switches)
    # with --cores, the plain model (fitted and checked without it) is shown beside: what the correction buys
    fits_plain = _fit_all(rows, fit_np, None, [])[0] if args.cores else fits
    validation_plain = _validation(rows, fits_plain, fit_np, None, {}) if args.cores else validation

    # the link model each predicted algorithm uses: its own fit, top-k the ring's, or the given network
    fallback = fits.get("ring") or fits.get("rhd") or next(iter(fits.values()), (0.0, 0.0))
    params = {}
    for algorithm in PREDICTED:
        alpha, beta = fits.get("ring" if algorithm in SPARSE else algorithm, fallback)
        params[algorithm] = (alpha_override if alpha_override is not None else alpha,
                             beta_override if beta_override is not None else beta)
    predictions = _predictions(work, params, args.topk_density, args.max_np)

    say(f"# alpha-beta model: compute {work['compute_s'] * 1e3:.2f} ms/step, gradient {_mib(work['gradient_bytes'])} "
        f"in {len(bucket_sizes(work['gradient_bytes'], work['bucket_bytes']))} bucket(s) of "
        f"{_mib(work['bucket_bytes'])}, top-k density {args.topk_density:g}")
    if fits:
        say(f"# fit on world sizes {sorted(fit_np)} from {args.sources}"
            + (f"; {args.cores} cores shared by the measured ranks: a phase takes as long as its busy ranks on the "
               "fullest core" if args.cores else ""))
        if switches:
            say(f"# core switch time from ranks pinned to one core: {args.shared_core_from}")
        switch_header = f"{'switch us':>11}" if switches else ""
        say(f"{'algorithm':<10}{'alpha us':>10}{'GB/s (1/beta)':>15}{switch_header}")
        for algorithm, (alpha, beta) in fits.items():
            switch_cell = f"{switches.get(algorithm, 0.0) * 1e6:>11.2f}" if switches else ""
            say(f"{algorithm:<10}{alpha * 1e6:>10.2f}{(1 / beta / 1e9 if beta else math.inf):>15.3f}{switch_cell}")
    if validation:
        say(f"# validation: predicted vs measured allreduce time over all message sizes (target within {TARGET_ERROR:.0%})")
        plain_header = f"{'plain median':>14}" if args.cores else ""
        say(f"{'algorithm':<10}{'N':>4}{'':>10}{'points':>8}{'median |err|':>14}{'max |err|':>11}{plain_header}")
        for v, plain in zip(validation, validation_plain):
            plain_cell = f"{plain['median_abs_error']:>14.1%}" if args.cores else ""
            say(f"{v['algorithm']:<10}{v['world_size']:>4}{'fitted' if v['in_fit'] else 'held out':>10}"
                f"{len(v['points']):>8}{v['median_abs_error']:>14.1%}{v['max_abs_error']:>11.1%}{plain_cell}")
    if alpha_override is not None or beta_override is not None:
        say(f"# network given: alpha {(alpha_override or 0) * 1e6:.2f} us, "
            f"{(1 / beta_override / 1e9) if beta_override else float('nan'):.2f} GB/s"
            + (" (the other from the fit)" if (alpha_override is None) != (beta_override is None) else ""))
    names = list(params)
    say("# predicted step time in ms (weak-scaling efficiency)")
    say(f"{'N':>6}" + "".join(f"{a:>18}" for a in names) + f"{'best':>7}{'dense':>7}")
    for row in predictions:
        cells = "".join(f"{row['algorithms'][a]['step_ms']:>10.2f} ({row['algorithms'][a]['efficiency']:>4.0%})" for a in names)
        say(f"{row['world_size']:>6}{cells}{row['best']:>7}{row['best_dense']:>7}")
    wins = _wins(predictions) + _wins(predictions, "best_dense", " among dense allreduces")
    for line in wins:
        say(f"# {line}")

    result = {"workload": work, "topk_density": args.topk_density, "fit_world_sizes": sorted(fit_np), "cores": args.cores,
              "shared_core_from": args.shared_core_from,
              "fits": {a: {"alpha_s": al, "beta_s_per_byte": be, "switch_s": switches.get(a, 0.0)}
                       for a, (al, be) in fits.items()},
              "link_model": {a: {"alpha_s": al, "beta_s_per_byte": be} for a, (al, be) in params.items()},
              "validation": validation, "predictions": predictions, "wins": wins}
    if args.cores:
        result["plain"] = {"fits": {a: {"alpha_s": al, "beta_s_per_byte": be} for a, (al, be) in fits_plain.items()},
                           "validation": validation_plain}
    if world.rank() == 0:
        if args.json_path:
            Path(args.json_path).expanduser().write_text(json.dumps(result, indent=1) + "\n")
            say(f"# wrote {args.json_path}")
        if args.plot:
            source = "given network" if alpha_override is not None and beta_override is not None else "fitted here"
            _plot(args.plot, predictions, validation,
                  f"compute {work['compute_s'] * 1e3:.1f} ms, {_mib(work['gradient_bytes'])} gradients, {source}")
            say(f"# wrote {args.plot}")
    return result
