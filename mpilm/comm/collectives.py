"""Allreduce and its two halves on flat 1-D torch tensors, in place.

Public API (kept stable; grad sync, ZeRO-1 and the benchmarks call it):
    allreduce(buf, comm=None, algorithm="auto", op="avg") -> buf
    reduce_scatter(buf, comm=None, op="avg") -> this rank's reduced slice (a view of buf)
    allgather(buf, comm=None) -> buf, every slice filled from its owner
    shard_bounds(n, p, r) -> (start, stop) of rank r's slice

This first version has only ``mpi`` (the library's own MPI_Allreduce); the hand-written
algorithms plug in behind the same call.
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from mpilm.comm import world

ALGORITHMS = ("mpi", "auto")


def shard_bounds(n: int, p: int, r: int) -> tuple[int, int]:
    """Rank r's contiguous slice of n elements split over p ranks (sizes differ by at most 1)."""
    return r * n // p, (r + 1) * n // p


def _finish(buf: torch.Tensor, p: int, op: str) -> torch.Tensor:
    if op == "avg" and p > 1:
        buf.div_(p)
    return buf


def allreduce(buf: torch.Tensor, comm: MPI.Comm | None = None, algorithm: str = "auto", op: str = "avg"):
    comm = comm or world.WORLD
    if op not in ("sum", "avg"):
        raise ValueError(f"allreduce: op {op!r}: expected 'sum' or 'avg'")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"allreduce: algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    p = comm.Get_size()
    if p == 1 or buf.numel() == 0:
        return _finish(buf, p, op)
    if buf.dtype in world.MPI_REDUCIBLE:
        comm.Allreduce(MPI.IN_PLACE, world.buf(buf), op=MPI.SUM)  # blocks until every rank contributed
    else:  # half types: MPI cannot add them; widen to fp32, reduce, narrow
        wide = buf.float()
        comm.Allreduce(MPI.IN_PLACE, world.buf(wide), op=MPI.SUM)
        buf.copy_(wide)
    return _finish(buf, p, op)


def reduce_scatter(buf: torch.Tensor, comm: MPI.Comm | None = None, op: str = "avg") -> torch.Tensor:
    comm = comm or world.WORLD
    allreduce(buf, comm, "mpi", op)
    lo, hi = shard_bounds(buf.numel(), comm.Get_size(), comm.Get_rank())
    return buf[lo:hi]


def allgather(buf: torch.Tensor, comm: MPI.Comm | None = None) -> torch.Tensor:
    comm = comm or world.WORLD
    p = comm.Get_size()
    if p == 1 or buf.numel() == 0:
        return buf
    counts = [shard_bounds(buf.numel(), p, r)[1] - shard_bounds(buf.numel(), p, r)[0] for r in range(p)]
    displs = [shard_bounds(buf.numel(), p, r)[0] for r in range(p)]
    memory, _, datatype = world.buf(buf)
    comm.Allgatherv(MPI.IN_PLACE, [memory, counts, displs, datatype])
    return buf
