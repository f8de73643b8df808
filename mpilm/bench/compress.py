"""``python -m mpilm.bench compress``: top-k selection and sparse accumulation, kernels vs torch.

For each size (``--sizes``, elements) at ``--density`` (k = ceil(density x n)):
- selection: ``torch.topk`` of ``|x|`` plus the gather of the signed values (what a compressor
  written with torch would run), the threshold algorithm in torch (``mpilm.kernels``' fallback)
  and the threshold kernel (C++). Kernel and twin must return the same pairs and torch.topk the
  same magnitudes (it breaks ties its own way); this is checked, so a broken kernel cannot post a
  fast number;
- accumulation: the pairs of ``--ranks`` ranks (k distinct indices each, in increasing order as
  the selection emits them, overlapping across ranks) added into a dense buffer by torch's
  ``index_add_`` and by the kernel, in one call each (checked equal).
Each repeat runs every contender once, round-robin, so they share the machine's noise; a cell is
the median over ``--repeats``. Ratios are taken within one run. One process, CPU tensors, torch's
intra-op threads (``--threads``, default torch's own choice).

``--json`` writes the rows, ``--plot`` a PNG of time vs size for both operations.

Limits: the C++ columns need the compiled kernels (``make kernels``); without them the run stops
with a usage error rather than report the fallback twice. 100M elements needs ~2.5 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from pathlib import Path

import torch

from mpilm import kernels
from mpilm.errors import UsageError
from mpilm.bench import pyplot

DESCRIPTION = "top-k selection and sparse accumulation kernels vs torch"

_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGkmg]?)\s*$")
_DECIMAL = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def parse_count(text: str, option: str) -> int:
    """``1000``, ``1M``, ``2.5M``, ``100M`` (decimal units: element counts) -> int."""
    match = _COUNT.match(text)
    if not match:
        raise UsageError(f"{option} {text}: expected a count like 1000, 1M or 100M")
    value = float(match.group(1)) * _DECIMAL[match.group(2).upper()]
    if value < 1 or value != int(value):
        raise UsageError(f"{option} {text}: expected a whole number of elements >= 1")
    return int(value)


def human_count(n: int) -> str:
    for unit, scale in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1M,10M,100M", help="comma-separated element counts (default %(default)s)")
    parser.add_argument("--density", type=float, default=0.01, help="fraction of entries selected (default %(default)s)")
    parser.add_argument("--ranks", type=int, default=4, help="ranks whose k pairs are accumulated (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per cell; the median is reported (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data (default %(default)s)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the rows to this JSON file")
    parser.add_argument("--plot", default=None, help="write time vs size to this PNG")


def _validated(args) -> list[int]:
    from mpilm.comm import world

    if world.size() > 1:
        raise UsageError(f"bench compress times one process; run it without mpirun (got {world.size()} ranks)")
    sizes = [parse_count(s, "--sizes") for s in args.sizes.split(",") if s.strip()]
    if not sizes:
        raise UsageError("--sizes: empty list; give element counts like 1M,10M")
    if not 0 < args.density <= 1:
        raise UsageError(f"--density {args.density}: expected a fraction in (0, 1], e.g. 0.01")
    if args.ranks < 1:
        raise UsageError(f"--ranks {args.ranks}: must be >= 1")
    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats}: must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    for option, path in (("--json", args.json_path), ("--plot", args.plot)):
        if path and not Path(path).expanduser().resolve().parent.is_dir():
            raise UsageError(f"{option} {path}: its directory does not exist")
    if kernels.load() is None:
        raise UsageError(f"the C++ kernels are not available ({kernels.status()}); build them with `make kernels`")
    return sizes


def _medians(contenders: dict, repeats: int) -> dict[str, float]:
    """Median seconds per contender; one untimed warm-up each, then round-robin repeats."""
    for fn in contenders.values():
        fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _torch_topk(x: torch.Tensor, k: int):
    idx = x.abs().topk(k, sorted=False).indices
    return idx, x[idx]


def _selection(n: int, k: int, repeats: int, gen: torch.Generator) -> dict:
    x = torch.randn(n, generator=gen)
    out_idx, out_val = torch.empty(k, dtype=torch.int32), torch.empty(k)
    twin_idx, twin_val = torch.empty(k, dtype=torch.int32), torch.empty(k)
    times = _medians({
        "torch_topk": lambda: _torch_topk(x, k),
        "threshold_torch": lambda: kernels.topk(x, k, twin_idx, twin_val, backend="torch"),
        "threshold_cpp": lambda: kernels.topk(x, k, out_idx, out_val, backend="kernel"),
    }, repeats)
    # kernel and twin: the same pairs; torch.topk: the same magnitudes (it breaks ties its own way)
    reference = kernels.magnitude_keys(_torch_topk(x, k)[1]).sort().values
    if not (torch.equal(out_idx, twin_idx) and torch.equal(out_val, twin_val)
            and torch.equal(kernels.magnitude_keys(out_val).sort().values, reference)):
        raise RuntimeError(f"bench compress: selections disagree at n={n}, k={k}")
    return times


def _accumulation(n: int, k: int, ranks: int, repeats: int, gen: torch.Generator) -> dict:
    # each rank's k distinct indices in increasing order, as the selection emits them
    idx = torch.cat([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(ranks)]).to(torch.int32)
    val = torch.randn(idx.numel(), generator=gen)
    via_torch, via_kernel = torch.zeros(n), torch.zeros(n)
    times = _medians({
        "index_add": lambda: via_torch.index_add_(0, idx, val),
        "accumulate_cpp": lambda: kernels.sparse_accumulate(via_kernel, idx, val, backend="kernel"),
    }, repeats)
    if not torch.equal(via_torch, via_kernel):
        raise RuntimeError(f"bench compress: accumulations disagree at n={n}")
    return times


def _table(rows: list[dict], header: str) -> str:
    lines = [header,
             f"{'elements':>9} {'k':>9} {'torch.topk':>11} {'thr torch':>10} {'thr C++':>9} {'C++/topk':>9}"
             f" | {'pairs':>9} {'index_add_':>11} {'acc C++':>9} {'C++/torch':>10}",
             f"{'':>9} {'':>9} {'ms':>11} {'ms':>10} {'ms':>9} {'speed-up':>9} | {'':>9} {'ms':>11} {'ms':>9} {'speed-up':>10}"]
    for r in rows:
        lines.append(
            f"{human_count(r['elements']):>9} {r['k']:>9} {r['torch_topk_ms']:11.2f} {r['threshold_torch_ms']:10.2f}"
            f" {r['threshold_cpp_ms']:9.2f} {r['speedup_vs_topk']:8.1f}x | {r['pairs']:>9} {r['index_add_ms']:11.2f}"
            f" {r['accumulate_cpp_ms']:9.2f} {r['speedup_vs_index_add']:9.1f}x")
    return "\n".join(lines)


def _plot(path: str, rows: list[dict], title: str) -> None:
    plt = pyplot()

    sizes = [r["elements"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for key, label in (("torch_topk_ms", "torch.topk"), ("threshold_torch_ms", "threshold (torch)"),
                       ("threshold_cpp_ms", "threshold kernel (C++)")):
        left.plot(sizes, [r[key] for r in rows], marker="o", label=label)
    left.set_title("top-k selection")
    for key, label in (("index_add_ms", "torch index_add_"), ("accumulate_cpp_ms", "accumulate kernel (C++)")):
        right.plot(sizes, [r[key] for r in rows], marker="o", label=label)
    right.set_title(f"sparse accumulation ({rows[0]['ranks']} ranks' pairs)")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bucket elements")
        ax.set_ylabel("median time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> dict:
    sizes = _validated(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for n in sizes:
        k = max(1, math.ceil(args.density * n * (1.0 - 1e-12)))
        sel = _selection(n, k, args.repeats, gen)
        acc = _accumulation(n, k, args.ranks, args.repeats, gen)
        rows.append({
            "elements": n, "k": k, "density": args.density, "ranks": args.ranks, "pairs": args.ranks * k,
            "torch_topk_ms": sel["torch_topk"] * 1e3, "threshold_torch_ms": sel["threshold_torch"] * 1e3,
            "threshold_cpp_ms": sel["threshold_cpp"] * 1e3,
            "speedup_vs_topk": sel["torch_topk"] / sel["threshold_cpp"],
            "index_add_ms": acc["index_add"] * 1e3, "accumulate_cpp_ms": acc["accumulate_cpp"] * 1e3,
            "speedup_vs_index_add": acc["index_add"] / acc["accumulate_cpp"],
        })
    header = (f"compress kernels: density {args.density:g}, {threads} torch thread(s), median of {args.repeats}, "
              f"kernels {kernels.status()}")
    print(_table(rows, header), flush=True)
    result = {"bench": "compress", "threads": threads, "repeats": args.repeats, "torch": torch.__version__,
              "kernels": kernels.status(), "rows": rows}
    if args.json_path:
        Path(args.json_path).expanduser().write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        _plot(str(Path(args.plot).expanduser()), rows, header)
    return result
