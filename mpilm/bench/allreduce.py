"""``python -m mpilm.bench allreduce``: latency/bandwidth sweep of every Allreduce algorithm vs MPI.

For each message size (``--min-bytes`` to ``--max-bytes`` by ``--factor``) every algorithm runs
``--warmup`` untimed calls, then ``--iters`` timed rounds; each round runs every algorithm once,
in a shuffled order (so they all see the same machine noise and none always follows the same
one). Each timed call starts after a Barrier; its time is the slowest rank's, and a point is
the median over rounds. The table follows
nccl-tests: algbw = bytes / time, busbw = algbw x 2(p-1)/p (the per-rank link traffic of a
bandwidth-optimal allreduce, comparable across world sizes), and ``vs mpi`` = mpi's time / this
time (> 1: faster than the MPI library). Only rank 0 prints.

``--json`` writes the rows, ``--plot`` draws busbw vs size with the memcpy bandwidth of one
rank (one thread, every rank copying at once) at the same sizes as the physical ceiling,
``--tune`` writes the winners as the thresholds ``algorithm="auto"`` uses (see ``mpilm/comm/tuning.py``).

``--device cuda`` times CUDA buffers (``cuda:<local rank>``; ranks may share one GPU): each
call's time includes a device synchronize, and what runs is what the dispatcher picks for device
memory (device pointers to a CUDA-aware MPI, else the host-staged pipelines; the header says which).

Limits: the memcpy ceiling of ``--plot`` is drawn for host buffers only; ``--tune`` and
``--shared-buffer`` are host-only. The data is refilled with
ones before every call (outside the timed region) and the result is checked after the last one,
so a broken algorithm cannot post a fast number.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from mpilm.bench import parse_algorithms, pyplot
from mpilm.comm import collectives, common, shm, tuning, world
from mpilm.errors import UsageError

DESCRIPTION = "allreduce bandwidth/latency sweep of every algorithm vs MPI_Allreduce (nccl-tests style)"

DEFAULT_ALGORITHMS = "ring,rhd,tree,mpi,auto"
DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "float16": torch.float16, "bfloat16": torch.bfloat16}
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGkmg]?)(?:[iI]?[bB])?\s*$")
RECOMMENDED_ITERS = 20


def parse_bytes(text: str, option: str) -> int:
    """``4096``, ``4K``, ``256M``, ``1G`` (binary units; ``KiB``/``KB`` also read as 1024) -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"{option} {text}: expected a size like 4096, 4K, 256M or 1G")
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value < 1 or value != int(value):
        raise UsageError(f"{option} {text}: expected a whole number of bytes >= 1")
    return int(value)


def human_bytes(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algorithms", default=DEFAULT_ALGORITHMS,
                        help=f"comma-separated, from {','.join(collectives.ALGORITHMS)} (default %(default)s)")
    parser.add_argument("--min-bytes", default="4K", help="smallest message, K/M/G suffixes (default %(default)s)")
    parser.add_argument("--max-bytes", default="256M", help="largest message (default %(default)s)")
    parser.add_argument("--factor", type=float, default=4, help="size step (default %(default)s)")
    parser.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)} (default %(default)s)")
    parser.add_argument("--iters", type=int, default=RECOMMENDED_ITERS,
                        help="timed iterations per point (default %(default)s; fewer only for smoke tests)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per algorithm and size (default %(default)s)")
    parser.add_argument("--segment-bytes", default=None,
                        help="ring/rhd/tree message segment size, K/M suffixes (default: mpilm.comm.common.SEGMENT_BYTES)")
    parser.add_argument("--shared-buffer", action="store_true",
                        help="allocate the message in the node's shared-memory window, as training does for "
                             "shm/hier/auto (every algorithm then reads the same memory)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the message lives: host memory, or this rank's GPU (default %(default)s)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the rows to this JSON file")
    parser.add_argument("--plot", default=None, help="write busbw vs size to this PNG")
    parser.add_argument("--tune", action="store_true",
                        help="time the algorithms and write the thresholds 'auto' uses to the tuning file")
    parser.add_argument("--tuning-file", default=None,
                        help="tuning JSON to read (and with --tune, write); default $MPILM_TUNING or "
                             f"{tuning.DEFAULT_PATH}")


def _validated(args) -> dict:
    """Everything checked on replicated values, so every rank raises the same UsageError."""
    algorithms = parse_algorithms(args.algorithms)
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype}: choose one of {', '.join(DTYPES)}")
    dtype = DTYPES[args.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    lo, hi = parse_bytes(args.min_bytes, "--min-bytes"), parse_bytes(args.max_bytes, "--max-bytes")
    if lo < itemsize:
        raise UsageError(f"--min-bytes {args.min_bytes}: smaller than one {args.dtype} element ({itemsize} bytes)")
    if hi < lo:
        raise UsageError(f"--max-bytes {args.max_bytes}: smaller than --min-bytes {args.min_bytes}")
    if not args.factor > 1:
        raise UsageError(f"--factor {args.factor}: must be > 1")
    if args.iters < 1:
        raise UsageError(f"--iters {args.iters}: must be >= 1 ({RECOMMENDED_ITERS} or more for numbers you quote)")
    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup}: must be >= 0")
    segment = None if args.segment_bytes is None else parse_bytes(args.segment_bytes, "--segment-bytes")
    if args.device == "cuda" and (args.tune or args.shared_buffer):
        raise UsageError(f"--device cuda with {'--tune' if args.tune else '--shared-buffer'}: host buffers only")
    timed = [a for a in algorithms if a != "auto"] if args.tune else algorithms
    if args.tune and not timed:
        raise UsageError("--tune: --algorithms names no candidate besides auto")
    sizes, size = [], lo
    while size <= hi:
        count = size // itemsize
        if not sizes or count * itemsize != sizes[-1]:
            sizes.append(count * itemsize)
        size = int(size * args.factor) if int(size * args.factor) > size else size + 1
    return {"algorithms": timed, "dtype": dtype, "sizes": sizes, "segment": segment}


def _check_writable(args) -> None:
    """Fail before minutes of timing, not after: rank 0 tries the output paths, all ranks agree."""
    problem = None
    if world.rank() == 0:
        targets = [("--json", args.json_path), ("--plot", args.plot)]
        if args.tune:
            targets.append(("--tuning-file", str(tuning.tuning_path(args.tuning_file))))
        for option, path in targets:
            if path is None:
                continue
            parent = Path(path).expanduser().resolve().parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
                probe = parent / f".mpilm-write-probe-{world.rank()}"
                probe.touch()
                probe.unlink()
            except OSError as err:
                problem = f"{option} {path}: cannot write there ({err.strerror or err})"
                break
    problem = world.WORLD.bcast(problem, root=0)  # cold path: all ranks learn rank 0's verdict
    if problem:
        raise UsageError(problem)


def _time_size(comm, algorithms, count, dtype, iters, warmup, shared=False, device="cpu") -> dict[str, float]:
    """Median over iterations of the slowest rank's time (seconds) per algorithm at one size."""
    if not shared:
        return _time_buffer(comm, algorithms, torch.empty(count, dtype=dtype, device=device), iters, warmup)
    buf = shm.alloc_shared_buffer(count, dtype, comm)  # collective over the node
    try:
        return _time_buffer(comm, algorithms, buf, iters, warmup)
    finally:
        shm.free_shared_buffer(buf, comm)  # collective over the node


def _time_buffer(comm, algorithms, buf, iters, warmup) -> dict[str, float]:
    p, count = comm.Get_size(), buf.numel()
    for name in algorithms:
        for _ in range(warmup):
            buf.fill_(1)
            collectives.allreduce(buf, comm, name, "sum")
    samples = np.zeros((len(algorithms), iters))
    for it in range(iters):
        # a fresh order each round (seeded, so the same on every rank): no algorithm always runs
        # right after the same other one and inherits its after-effects (caches, a lagging peer)
        order = list(range(len(algorithms)))
        random.Random(it).shuffle(order)
        for k in order:
            buf.fill_(1)  # fresh inputs, outside the timed region
            if buf.is_cuda:
                torch.cuda.synchronize(buf.device)  # ... the fill included
            comm.Barrier()  # blocks until every rank is here: all start together
            start = time.perf_counter()
            collectives.allreduce(buf, comm, algorithms[k], "sum")
            if buf.is_cuda:
                torch.cuda.synchronize(buf.device)  # the device work the call queued is part of its time
            samples[k, it] = time.perf_counter() - start
            if it == iters - 1 and not bool((buf == p).all()):
                raise RuntimeError(f"allreduce {algorithms[k]} gave a wrong result at {count} elements")
    comm.Allreduce(MPI.IN_PLACE, samples, op=MPI.MAX)  # per-iteration time = the slowest rank's
    return {name: float(statistics.median(samples[k])) for k, name in enumerate(algorithms)}


def _memcpy_bandwidth(comm, count: int, dtype: torch.dtype, iters: int) -> float:
    """``copy_`` bandwidth (bytes/s) of one rank, one thread, while every rank copies at once.

    The ceiling drawn in the plot: an allreduce of n bytes makes each rank read at least n bytes
    (its slice from every rank) and write n (the result), a memcpy's worth of traffic per core,
    with the node's memory shared by all ranks as it is here. Collective over ``comm``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per rank, as the collectives use
    try:
        src = torch.ones(count, dtype=dtype)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        times = []
        for _ in range(iters):
            comm.Barrier()  # blocks: every rank starts its copy together
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return src.numel() * src.element_size() / statistics.median(times)


_HEADER = (f"{'size':>10} {'count':>11} {'type':>8} {'algorithm':>12} {'time(us)':>11} "
           f"{'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'vs mpi':>7}")


def _table_row(row: dict) -> str:
    name = row["algorithm"] + (f"({row['chose']})" if "chose" in row else "")
    ratio = f"{row['vs_mpi']:7.2f}" if row.get("vs_mpi") is not None else f"{'-':>7}"
    return (f"{human_bytes(row['size_bytes']):>10} {row['count']:>11} {row['dtype']:>8} {name:>12} "
            f"{row['time_us']:11.1f} {row['algbw_gbps']:11.3f} {row['busbw_gbps']:11.3f} {ratio}")


def _plot(path: str, rows: list[dict], memcpy: dict[int, float], p: int, dtype: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(row["algorithm"] for row in rows):
        mine = [row for row in rows if row["algorithm"] == name]
        ax.plot([r["size_bytes"] for r in mine], [r["busbw_gbps"] for r in mine], marker="o", label=name)
    ceiling = sorted(memcpy)
    if ceiling:
        ax.plot(ceiling, [memcpy[s] / 1e9 for s in ceiling], "k--", label="memcpy per rank, all ranks at once (ceiling)")
    sizes = sorted({row["size_bytes"] for row in rows})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # latency-bound and bandwidth-bound sizes differ by orders of magnitude
    ax.set_xticks(sizes, [human_bytes(s) for s in sizes])
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("busbw (GB/s, log scale)")
    ax.set_title(f"allreduce busbw, {p} ranks, {dtype}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> None:
    settings = _validated(args)
    _check_writable(args)
    if args.tuning_file is not None:
        tuning.use_file(args.tuning_file)
    default_segment = common.SEGMENT_BYTES
    if settings["segment"] is not None:
        common.SEGMENT_BYTES = settings["segment"]
    try:
        _sweep(args, settings)
    finally:
        common.SEGMENT_BYTES = default_segment


def _sweep(args, settings: dict) -> None:
    device = world.pick_device(args.device)  # one torch thread per core share, as the trainer runs
    comm = world.WORLD
    p = comm.Get_size()
    dtype, dtype_label = settings["dtype"], args.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    algorithms = settings["algorithms"]
    rpn = tuning.ranks_per_node(comm)
    world.say(f"# mpilm allreduce: {p} ranks ({rpn} per node), {dtype_label}, op sum, "
              f"median of {args.iters} iterations after {args.warmup} warm-up, time = slowest rank"
              + (", message in node shared memory" if args.shared_buffer else ""))
    world.say(f"# {world.mpi_description()}; ring segment {human_bytes(common.SEGMENT_BYTES)}"
              + ("; --tune: timing candidates, auto not run" if args.tune else ""))
    if device.type == "cuda":
        world.say(f"# CUDA buffers on {torch.cuda.get_device_name(device)} ({torch.cuda.device_count()} visible, "
                  f"ranks share them round-robin); ring runs "
                  f"{collectives.algorithm_that_runs('ring', device, comm)}, mpi "
                  f"{collectives.algorithm_that_runs('mpi', device, comm)}")
    if args.iters < RECOMMENDED_ITERS:
        world.say(f"# note: --iters {args.iters} < {RECOMMENDED_ITERS}: smoke-test numbers, do not quote them")
    if "auto" in algorithms and p > 1:
        source = tuning.rules(comm, dtype)[1]
        world.say(f"# auto thresholds: {source}")

    world.say(_HEADER)
    rows: list[dict] = []
    memcpy: dict[int, float] = {}
    bus_factor = 2 * (p - 1) / p if p > 1 else 1.0
    for nbytes in settings["sizes"]:
        count = nbytes // itemsize
        times = _time_size(comm, algorithms, count, dtype, args.iters, args.warmup, args.shared_buffer, device)
        if args.plot and device.type == "cpu":
            memcpy[nbytes] = _memcpy_bandwidth(comm, count, dtype, args.iters)  # collective
        size_rows = []
        for name in algorithms:
            seconds = times[name]
            algbw = nbytes / seconds / 1e9
            row = {"size_bytes": nbytes, "count": count, "dtype": dtype_label, "algorithm": name,
                   "world_size": p, "time_us": seconds * 1e6, "algbw_gbps": algbw,
                   "busbw_gbps": algbw * bus_factor,
                   "vs_mpi": times["mpi"] / seconds if "mpi" in times else None,
                   "buffer": "shared" if args.shared_buffer else "private", "device": device.type}
            if name == "auto":
                row["chose"] = collectives.describe_auto([nbytes], comm, dtype, device=device)[0][1]
            size_rows.append(row)
        rows.extend(size_rows)
        for row in size_rows:
            world.say(_table_row(row))

    if args.tune:
        if p == 1:
            world.say("# --tune: one rank moves nothing; no thresholds written")
        else:
            times_by_alg = {name: [r["time_us"] for r in rows if r["algorithm"] == name] for name in algorithms}
            rules = tuning.rules_from_timings(settings["sizes"], times_by_alg)
            path = tuning.tuning_path(args.tuning_file)
            if world.rank() == 0:
                tuning.write_entry(path, p, rpn, dtype, rules, iters=args.iters,
                                   sizes=settings["sizes"], candidates=algorithms)
            comm.Barrier()  # blocks until rank 0 has written the file
            tuning.forget()
            world.say(f"# wrote auto thresholds to {path}: "
                      + ", ".join(f"<= {human_bytes(lim)}: {alg}" if lim is not None else f"above: {alg}"
                                  for lim, alg in rules))
    if world.rank() == 0:
        if args.json_path:
            out = Path(args.json_path).expanduser()
            out.write_text(json.dumps(rows, indent=1) + "\n")
            world.say(f"# wrote {out}")
        if args.plot:
            _plot(args.plot, rows, memcpy, p, dtype_label)
            world.say(f"# wrote {args.plot}")


