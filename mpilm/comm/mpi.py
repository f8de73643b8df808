"""The MPI library's own collectives (``algorithm="mpi"``): the baseline mpilm is measured against.

``allreduce`` (``MPI_Allreduce``), ``reduce_scatter`` (``MPI_Reduce_scatter``, onto this rank's
``shard_bounds`` slice) and ``allgather`` (``MPI_Allgatherv``), in place on 1-D tensors, run on
the communicator's private duplicate (``p2p.private_comm``), as mpilm's own algorithms do: a
user's traffic on ``comm`` never meets them, and a communication thread and the main thread
each on their own communicator never share one.

Half types are widened to an fp32 copy, reduced by MPI and narrowed back (MPI has no bf16 and
its fp16 support is an optional extension). Traffic is an estimate: MPI does not say what it
moved, so we count a bandwidth-optimal ring's share of the bytes handed to MPI each way.
CUDA tensors go to MPI as device pointers (only with a CUDA-aware MPI; otherwise ``staging``
brings them to host first).
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from mpilm.comm import common, p2p, world
from mpilm.comm.common import shard_bounds, shard_counts


def allreduce(buf: torch.Tensor, comm: MPI.Comm, op: str = "avg") -> torch.Tensor:
    """``MPI_Allreduce`` of ``buf`` in place; returns ``buf``."""
    common.check_op(op, "mpi")
    g = p2p.group(comm)
    p = g.size
    if p == 1 or buf.numel() == 0:
        return common.finish(buf, p, op)
    wide = common.widened(buf)
    p2p.device_sync(buf)  # CUDA: MPI reads finished data
    g.comm.Allreduce(MPI.IN_PLACE, world.buf(wide), op=MPI.SUM)  # blocks until every rank contributed
    estimate = 2 * (p - 1) * wide.numel() * wide.element_size() // p
    world.traffic.add(sent=estimate, received=estimate)
    if wide is not buf:
        if op == "avg":
            wide.div_(p)  # in fp32, so the half result is rounded once
        buf.copy_(wide)
        return buf
    return common.finish(buf, p, op)


def reduce_scatter(buf: torch.Tensor, comm: MPI.Comm, op: str = "avg") -> torch.Tensor:
    """``MPI_Reduce_scatter`` onto this rank's ``shard_bounds`` slice; returns that view of ``buf``.

    On an fp32 (or native fp64) copy; cold path, not in place. The rest of ``buf`` is untouched.
    """
    common.check_op(op, "mpi")
    g = p2p.group(comm)
    p, n = g.size, buf.numel()
    lo, hi = shard_bounds(n, p, g.rank)
    mine = buf[lo:hi]
    if p == 1 or n == 0:
        return common.finish(mine, p, op)
    wide = common.widened(buf)  # only read: the result lands apart
    counts, _ = shard_counts(n, p)
    result = torch.empty(hi - lo, dtype=wide.dtype, device=wide.device)
    p2p.device_sync(buf)  # CUDA: MPI reads finished data
    g.comm.Reduce_scatter(world.buf(wide), world.buf(result), counts, op=MPI.SUM)  # blocks on all ranks
    estimate = (p - 1) * n * wide.element_size() // p
    world.traffic.add(sent=estimate, received=estimate)
    if op == "avg":
        result.div_(p)
    mine.copy_(result)
    return mine


def allgather(buf: torch.Tensor, comm: MPI.Comm) -> torch.Tensor:
    """``MPI_Allgatherv`` filling every rank's ``shard_bounds`` slice of ``buf`` in place."""
    g = p2p.group(comm)
    p, n = g.size, buf.numel()
    if p == 1 or n == 0:
        return buf
    counts, displs = shard_counts(n, p)
    memory, _, datatype = world.buf(buf)
    p2p.device_sync(buf)  # CUDA: MPI reads finished data
    g.comm.Allgatherv(MPI.IN_PLACE, [memory, counts, displs, datatype])  # blocks on all ranks
    estimate = (p - 1) * n * buf.element_size() // p
    world.traffic.add(sent=estimate, received=estimate)
    return buf
