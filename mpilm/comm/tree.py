"""Low-latency Allreduce for small messages: recursive doubling with fold-in.

Among a power-of-two core of p' ranks, lg p' steps: at step k every rank swaps its whole
vector with the partner whose rank differs in bit k (one blocking ``Sendrecv``) and adds the
partner's vector in. Both partners compute ``mine + theirs`` with the same two operands, so the
result is bit-identical on every rank. When p is not a power of two the first 2 rem ranks fold in
pairwise as in ``rhd.py`` (the shared ``p2p.fold_in`` map): the even rank sends its vector to
the odd one before the exchange and gets the result back after it.

Why recursive doubling rather than a binomial reduce + broadcast: both are logarithmic, but the
binomial pair needs 2 lg p latency steps where recursive doubling needs lg p' (+2 with fold-in),
and on small messages latency is the whole cost.

Cost (alpha-beta-gamma, n bytes): lg p' (alpha + n beta + n gamma), plus 2 alpha + 2 n beta +
n gamma with fold-in. Every step moves the full vector, so it loses to ``rhd`` and ``ring`` once
n beta outweighs alpha (between 64 and 256 KiB at 2 ranks on one node, see
``docs/figures/allreduce-np2.json``).

Half types (float16/bfloat16) are widened to fp32 for the whole reduction and rounded once at the
end (the average is divided in fp32 too): on small messages doubling the bytes costs next to
nothing, and the result is the fp32 sum rounded to the half type once instead of a half-typed
partial sum rounded at every step.

The vector moves in segments of ``common.SEGMENT_BYTES`` (each segment runs the full doubling), so a
large call, although not what this algorithm is for, still needs only segment-sized scratch.
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from mpilm.comm import common, p2p, world

_TAG_FOLD = 31
_TAG_DOUBLING = 32
_TAG_UNFOLD = 33


def allreduce(t: torch.Tensor, comm: MPI.Comm, op: str = "avg", segment_bytes: int | None = None) -> torch.Tensor:
    """Recursive-doubling Allreduce of ``t`` over ``comm`` in place; returns ``t``.

    Written for the small-message path: every per-call constant lives in the cached ``Group``
    and nothing is sliced or allocated when the message fits in one segment.
    """
    common.check_op(op, "tree")
    n = t.numel()
    g = p2p.group(comm)
    p = g.size
    if p == 1 or n == 0:
        return common.finish(t, p, op)
    widen = common.is_half(t.dtype)
    work_dtype = common.reduce_dtype(t.dtype)
    seg = common.segment_elems(4 if widen else t.element_size(), segment_bytes)
    private, r, rem, newrank = g.comm, g.rank, g.rem, g.newrank
    folds = r < 2 * rem
    on_device = t.is_cuda
    moved = 0  # bytes of one full vector in the work type, summed over segments

    for a, b in ((0, n),) if n <= seg else common.segments(0, n, seg):
        m = b - a
        if widen:
            work, work_wire = p2p.scratch(t, m, slot=0, dtype=torch.float32)
            work.copy_(t if m == n else t[a:b])
        else:
            work = t if m == n else t[a:b]
            work_wire = p2p.Wire(work)
        incoming, incoming_wire = p2p.scratch(t, m, slot=1, dtype=work_dtype)
        send_spec, recv_spec = work_wire.seg(0, m), incoming_wire.seg(0, m)
        moved += m * work_wire.itemsize
        if on_device:
            p2p.device_sync(t)  # CUDA: `work` must be written before MPI reads it

        if folds and newrank < 0:  # fold-in: hand the vector to r+1, get the result back
            private.Send(send_spec, r + 1, _TAG_FOLD)  # blocks until r+1 has taken it
            private.Recv(send_spec, r + 1, _TAG_UNFOLD)  # blocks on r+1 finishing the reduction
        else:
            if folds:
                private.Recv(recv_spec, r - 1, _TAG_FOLD)  # blocks on r-1 handing its vector over
                work.add_(incoming)
            for partner in g.doubling_partners:
                if on_device:
                    p2p.device_sync(t)  # CUDA: the previous add must finish before MPI sends `work`
                private.Sendrecv(send_spec, partner, _TAG_DOUBLING,
                                 recv_spec, partner, _TAG_DOUBLING)  # blocks on partner
                work.add_(incoming)
            if folds:
                if on_device:
                    p2p.device_sync(t)  # CUDA: the last add must finish before MPI sends `work`
                private.Send(send_spec, r - 1, _TAG_UNFOLD)  # blocks until r-1 has taken it

        if widen:
            if op == "avg":
                work.div_(p)  # divide in fp32 so the result is rounded to the half type once
            (t if m == n else t[a:b]).copy_(work)

    # messages each way: the even fold-in rank sends once and receives once; the others swap once
    # per doubling step, plus one receive and one send more for the odd fold-in ranks
    steps = 1 if newrank < 0 else len(g.doubling_partners) + (1 if folds else 0)
    world.traffic.add(sent=steps * moved, received=steps * moved)
    return t if widen else common.finish(t, p, op)
