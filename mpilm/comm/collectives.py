"""Allreduce and its two halves on flat 1-D torch tensors, in place; the algorithm dispatcher.

Public API (kept stable; grad sync, ZeRO-1 and the benchmarks call it):
    allreduce(buf, comm=None, algorithm="auto", op="avg") -> buf
    reduce_scatter(buf, comm=None, op="avg", algorithm="ring") -> this rank's reduced slice (a view)
    allgather(buf, comm=None, algorithm="ring") -> buf, every slice filled from its owner
    shard_bounds(n, p, r) -> (start, stop) of rank r's slice: the one definition of ownership
    describe_auto(sizes_bytes, comm=None, dtype=torch.float32) -> [(size, algorithm), ...]
    prepare(comm=None): the collective first-use set-up, done up front (before a comm thread starts)
    ALGORITHMS: the names ``allreduce`` accepts

Algorithms (each in its own module, all taking ``(buf, comm, op)``):
    ring  segmented, pipelined ring (``ring.py``): bandwidth-optimal, for large messages
    rhd   Rabenseifner halving/doubling (``rhd.py``): 2 lg p latency steps, medium/large messages
    tree  recursive doubling (``tree.py``): lg p steps of the whole vector, small messages
    shm   node shared-memory allreduce (``shm.py``), hier  node-aware two-level (``hier.py``)
    mpi   the MPI library's own ``MPI_Allreduce`` (the baseline)
    auto  per message size and world size, from the thresholds in ``tuning.py``

Every rank must call with the same length, dtype, algorithm and op; ``auto`` chooses from those
replicated values only, so all ranks run the same algorithm. Any length (0 included), any world
size, dtypes float32, float64, float16 and bfloat16 (MPI never reduces the half types: they
travel as raw 16-bit words and are added by torch).

What it does not: no bucketing or overlap with backward (``grad_sync.py``), no compression.
"""

from __future__ import annotations

import importlib

import torch
from mpi4py import MPI

from mpilm.comm import p2p, tuning, world

ALGORITHMS = ("ring", "rhd", "tree", "shm", "hier", "mpi", "auto")
# what reduce_scatter / allgather accept (both give rank r the shard_bounds slice r)
REDUCE_SCATTER_ALGORITHMS = ("ring", "mpi")
_HALF_TYPES = (torch.float16, torch.bfloat16)


def shard_bounds(n: int, p: int, r: int) -> tuple[int, int]:
    """Rank r's contiguous slice of n elements split over p ranks (sizes differ by at most 1)."""
    return r * n // p, (r + 1) * n // p


def _check(buf: torch.Tensor, algorithm: str, op: str, choices: tuple[str, ...], what: str) -> None:
    if op not in ("sum", "avg"):
        raise ValueError(f"{what}: op {op!r}: expected 'sum' or 'avg'")
    if algorithm not in choices:
        raise ValueError(f"{what}: algorithm {algorithm!r}: expected one of {', '.join(choices)}")
    if buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(f"{what}: expected a 1-D contiguous tensor, got shape {tuple(buf.shape)}")


def allreduce(buf: torch.Tensor, comm: MPI.Comm | None = None, algorithm: str = "auto", op: str = "avg"):
    """Sum (``op="sum"``) or average (``op="avg"``) ``buf`` over ``comm`` in place; returns ``buf``."""
    comm = comm or world.WORLD
    _check(buf, algorithm, op, ALGORITHMS, "allreduce")
    if buf.is_cuda and not world.cuda_aware():
        from mpilm.comm import staging  # lazy: CUDA staging through host memory (other module)

        return staging.allreduce_staged(buf, comm, algorithm, op)
    p = comm.Get_size()
    if p == 1 or buf.numel() == 0:
        return _finish(buf, p, op)
    if algorithm == "auto":
        algorithm = tuning.choose(buf.nbytes, comm, buf.dtype)
    if algorithm == "mpi":
        return mpi_allreduce(buf, comm, op)
    return _module(algorithm).allreduce(buf, comm, op)


_modules: dict = {}


def _module(algorithm: str):
    """The module implementing ``algorithm``, imported on first use.

    Lazy because shm and hier are written separately (this file works without them) and because
    ring/rhd/tree import ``shard_bounds`` from here.
    """
    module = _modules.get(algorithm)
    if module is None:
        module = _modules[algorithm] = importlib.import_module(f"mpilm.comm.{algorithm}")
    return module


def _finish(buf: torch.Tensor, p: int, op: str) -> torch.Tensor:
    return p2p.finish(buf, p, op)


def mpi_allreduce(buf: torch.Tensor, comm: MPI.Comm, op: str = "avg") -> torch.Tensor:
    """The MPI library's own Allreduce, in place.

    Half types are widened to an fp32 copy, reduced by MPI and narrowed back (MPI has no bf16 and
    its fp16 support is an optional extension). Traffic is an estimate: MPI does not say what it
    moved, so we count a bandwidth-optimal ring's 2(p-1)/p x the bytes handed to MPI each way.
    """
    p = comm.Get_size()
    if p == 1 or buf.numel() == 0:
        return _finish(buf, p, op)
    wide = buf.float() if buf.dtype in _HALF_TYPES else buf
    if buf.is_cuda:
        torch.cuda.current_stream(buf.device).synchronize()  # device sync: MPI reads finished data
    comm.Allreduce(MPI.IN_PLACE, world.buf(wide), op=MPI.SUM)  # blocks until every rank contributed
    estimate = 2 * (p - 1) * wide.numel() * wide.element_size() // p
    world.traffic.add(sent=estimate, received=estimate)
    if wide is not buf:
        if op == "avg":
            wide.div_(p)  # in fp32, so the half result is rounded once
        buf.copy_(wide)
        return buf
    return _finish(buf, p, op)


def reduce_scatter(buf: torch.Tensor, comm: MPI.Comm | None = None, op: str = "avg",
                   algorithm: str = "ring") -> torch.Tensor:
    """Reduce ``buf`` so that this rank's ``shard_bounds`` slice holds the result; returns that view.

    The rest of ``buf`` is left holding partial sums (overwritten by a following ``allgather``).
    ``algorithm``: ``ring`` (mpilm's pipelined ring) or ``mpi`` (``MPI_Reduce_scatter``).
    """
    comm = comm or world.WORLD
    _check(buf, algorithm, op, REDUCE_SCATTER_ALGORITHMS, "reduce_scatter")
    p, r = comm.Get_size(), comm.Get_rank()
    lo, hi = shard_bounds(buf.numel(), p, r)
    mine = buf[lo:hi]
    if p == 1 or buf.numel() == 0:
        return _finish(mine, p, op)
    if algorithm == "ring":
        _module("ring").reduce_scatter_sum(buf, comm)
        return _finish(mine, p, op)
    # mpi: the library's Reduce_scatter on an fp32 (or native fp64) copy; cold path, not in place
    wide = buf.float() if buf.dtype in _HALF_TYPES else buf  # only read: the result lands apart
    counts = [shard_bounds(buf.numel(), p, q)[1] - shard_bounds(buf.numel(), p, q)[0] for q in range(p)]
    result = torch.empty(hi - lo, dtype=wide.dtype, device=wide.device)
    if buf.is_cuda:
        torch.cuda.current_stream(buf.device).synchronize()  # device sync: MPI reads finished data
    comm.Reduce_scatter(world.buf(wide), world.buf(result), counts, op=MPI.SUM)  # blocks on all ranks
    estimate = (p - 1) * wide.numel() * wide.element_size() // p
    world.traffic.add(sent=estimate, received=estimate)
    if op == "avg":
        result.div_(p)
    mine.copy_(result)
    return mine


def allgather(buf: torch.Tensor, comm: MPI.Comm | None = None, algorithm: str = "ring") -> torch.Tensor:
    """Fill every rank's ``shard_bounds`` slice of ``buf`` from that rank, in place; returns ``buf``."""
    comm = comm or world.WORLD
    _check(buf, algorithm, "sum", REDUCE_SCATTER_ALGORITHMS, "allgather")
    p = comm.Get_size()
    if p == 1 or buf.numel() == 0:
        return buf
    if algorithm == "ring":
        _module("ring").allgather(buf, comm)
        return buf
    n = buf.numel()
    counts = [shard_bounds(n, p, q)[1] - shard_bounds(n, p, q)[0] for q in range(p)]
    displs = [shard_bounds(n, p, q)[0] for q in range(p)]
    memory, _, datatype = world.buf(buf)
    if buf.is_cuda:
        torch.cuda.current_stream(buf.device).synchronize()  # device sync: MPI reads finished data
    comm.Allgatherv(MPI.IN_PLACE, [memory, counts, displs, datatype])  # blocks on all ranks
    estimate = (p - 1) * n * buf.element_size() // p
    world.traffic.add(sent=estimate, received=estimate)
    return buf


def prepare(comm: MPI.Comm | None = None, tuning_file=None) -> None:
    """Do every collective first-use set-up on ``comm`` now: call on all ranks, from the main thread.

    The algorithms create a private duplicate of ``comm`` and ``auto`` loads its tuning table on
    first use; both are collective over ``comm``. A trainer that later calls ``allreduce`` from a
    communication thread calls this first, so that set-up never races its main thread's own
    collectives on the same communicator.
    """
    comm = comm or world.WORLD
    p2p.group(comm)
    if comm.Get_size() > 1:
        tuning.rules(comm, torch.float32, tuning_file)


def describe_auto(sizes_bytes, comm: MPI.Comm | None = None, dtype: torch.dtype = torch.float32,
                  tuning_file=None) -> list[tuple[int, str]]:
    """What ``algorithm="auto"`` runs for each message size (bytes) of ``dtype`` on ``comm``.

    Returns ``[(size_bytes, algorithm), ...]``; ``"none"`` where nothing moves (one rank, or an
    empty message). Collective on first use per communicator (it loads and broadcasts the tuning
    table), so call it on every rank.
    """
    comm = comm or world.WORLD
    if comm.Get_size() == 1:
        return [(int(s), "none") for s in sizes_bytes]
    return [(int(s), tuning.choose(int(s), comm, dtype, tuning_file) if s > 0 else "none") for s in sizes_bytes]
