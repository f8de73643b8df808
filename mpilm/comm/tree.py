"""Low-latency Allreduce for small messages: recursive doubling with fold-in.

Among a power-of-two core of p' ranks, lg p' steps: at step k every rank swaps its whole
vector with the partner whose rank differs in bit k (one blocking ``Sendrecv``) and adds the
partner's vector in. Both partners compute ``mine + theirs`` with the same two operands, so the
result is bit-identical on every rank. When p is not a power of two the first 2 rem ranks fold in
pairwise as in ``rhd.py`` (same ``fold_in`` map): the even rank sends its vector to the odd one
before the exchange and gets the result back after it.

Why recursive doubling rather than a binomial reduce + broadcast: both are logarithmic, but the
binomial pair needs 2 lg p latency steps where recursive doubling needs lg p' (+2 with fold-in),
and on small messages latency is the whole cost.

Cost (alpha-beta-gamma, n bytes): lg p' (alpha + n beta + n gamma), plus 2 alpha + 2 n beta +
n gamma with fold-in. Every step moves the full vector, so it loses to ``rhd`` and ``ring`` once
n beta outweighs alpha (tens of KiB on shared memory).

Half types (float16/bfloat16) are widened to fp32 for the whole reduction and rounded once at the
end (the average is divided in fp32 too): on small messages doubling the bytes costs next to
nothing and the result is the exactly rounded fp32 sum instead of one rounded lg p times.

The vector moves in segments of ``SEGMENT_BYTES`` (each segment runs the full doubling), so a
large call, although not what this algorithm is for, still needs only segment-sized scratch.
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from mpilm.comm import p2p, world
from mpilm.comm.rhd import core_to_rank, fold_in

SEGMENT_BYTES = 1 << 20
_HALF_TYPES = (torch.float16, torch.bfloat16)

_TAG_FOLD = 31
_TAG_DOUBLING = 32
_TAG_UNFOLD = 33


def allreduce(t: torch.Tensor, comm: MPI.Comm, op: str = "avg", segment_bytes: int | None = None) -> torch.Tensor:
    """Recursive-doubling Allreduce of ``t`` over ``comm`` in place; returns ``t``."""
    p2p.check_op(op)
    p = comm.Get_size()
    n = t.numel()
    if p == 1 or n == 0:
        return p2p.finish(t, p, op)
    comm = p2p.private_comm(comm)
    r = comm.Get_rank()
    widen = t.dtype in _HALF_TYPES
    work_dtype = torch.float32 if widen else t.dtype
    size = SEGMENT_BYTES if segment_bytes is None else segment_bytes
    if size < 1:
        raise ValueError(f"tree: segment_bytes={size}: must be >= 1")
    seg = max(1, size // (4 if widen else t.element_size()))
    core, rem, newrank = fold_in(p, r)
    sent = received = 0
    whole_wire = None if widen or n > seg else p2p.Wire(t)

    for a, b in p2p.segments(0, n, seg):
        m = b - a
        if widen:
            work, work_wire = p2p.scratch(t, m, slot=0, dtype=torch.float32)
            work.copy_(t if m == n else t[a:b])
        elif whole_wire is not None:  # the common small message: no slicing at all
            work, work_wire = t, whole_wire
        else:
            work = t[a:b]
            work_wire = p2p.Wire(work)
        incoming, incoming_wire = p2p.scratch(t, m, slot=1, dtype=work_dtype)
        nbytes = m * work_wire.itemsize
        p2p.device_sync(t)  # CUDA: `work` must be written before MPI reads it

        if r < 2 * rem:  # fold-in pair: even rank hands its vector to the odd one
            if newrank < 0:
                comm.Send(work_wire.seg(0, m), r + 1, _TAG_FOLD)  # blocks until r+1 has taken it
                sent += nbytes
            else:
                comm.Recv(incoming_wire.seg(0, m), r - 1, _TAG_FOLD)  # blocks on r-1
                work.add_(incoming)
                received += nbytes

        if newrank >= 0:
            mask = 1
            while mask < core:
                partner = core_to_rank(newrank ^ mask, rem)
                p2p.device_sync(t)  # CUDA: the previous add must finish before MPI sends `work`
                comm.Sendrecv(work_wire.seg(0, m), partner, _TAG_DOUBLING,
                              incoming_wire.seg(0, m), partner, _TAG_DOUBLING)  # blocks on partner
                work.add_(incoming)
                sent += nbytes
                received += nbytes
                mask <<= 1

        if r < 2 * rem:  # unfold: the odd rank returns the result to its even partner
            if newrank < 0:
                comm.Recv(work_wire.seg(0, m), r + 1, _TAG_UNFOLD)  # blocks on r+1 finishing
                received += nbytes
            else:
                p2p.device_sync(t)  # CUDA: the last add must finish before MPI sends `work`
                comm.Send(work_wire.seg(0, m), r - 1, _TAG_UNFOLD)  # blocks until r-1 has taken it
                sent += nbytes

        if widen:
            if op == "avg":
                work.div_(p)  # divide in fp32 so the result is rounded to the half type once
            (t if m == n else t[a:b]).copy_(work)
    world.traffic.add(sent=sent, received=received)
    return t if widen else p2p.finish(t, p, op)
