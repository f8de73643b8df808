"""Rabenseifner's Allreduce: recursive-halving reduce-scatter + recursive-doubling allgather.

Among a power-of-two group of p' ranks, the reduce-scatter takes lg p' steps: at step k a rank
swaps half of its current range with the partner whose rank differs in bit k (highest bit first),
keeps the half it owns and adds the partner's copy of it in. After lg p' steps rank i owns block
i of p' equal blocks. The allgather retraces the steps in reverse, doubling the owned range each
time (received straight into place, no copies).

World sizes that are not a power of two fold in first (as MPICH does): with rem = p - p',
each even rank below 2 rem sends its whole buffer to the odd rank above it, which adds it and
stands for both; the even ranks sit out and get the result back at the end (``p2p.fold_in``).

Cost (alpha-beta-gamma, n bytes): 2 lg p' alpha + 2 (p'-1)/p' n beta + (p'-1)/p' n gamma, plus
2 alpha + 2 n beta + n gamma on the fold-in pairs when p is not a power of two. So: the ring's
bandwidth term with only 2 lg p' latency steps instead of 2(p-1), which makes it the choice for
medium messages and for large ones at power-of-two p; the fold-in makes the ring better for very
large messages at other world sizes.

Every transfer moves as segments of ``common.SEGMENT_BYTES``, the doubling too (``p2p.exchange``:
one multi-megabyte message ran at half a TCP link's rate). Those added into the buffer go through
a small window of cached scratch slots (``p2p.exchange_reduce``), so no temporary larger than a
segment exists, also for the fold-in. Half types travel and add in their own type, as in the ring (see
``ring.py``); results are bit-identical on all ranks (the allgather copies owners' bytes).
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from mpilm.comm import common, p2p, world
from mpilm.comm.common import shard_bounds

_TAG_FOLD = 21
_TAG_HALVING = 22
_TAG_DOUBLING = 23
_TAG_UNFOLD = 24


def allreduce(t: torch.Tensor, comm: MPI.Comm, op: str = "avg", segment_bytes: int | None = None) -> torch.Tensor:
    """Rabenseifner Allreduce of ``t`` over ``comm`` in place; returns ``t``."""
    common.check_op(op, "rhd")
    n = t.numel()
    g = p2p.group(comm)
    p = g.size
    if p == 1 or n == 0:
        return common.finish(t, p, op)
    comm, r = g.comm, g.rank
    core, rem, newrank = g.core, g.rem, g.newrank
    seg = common.segment_elems(t.element_size(), segment_bytes)  # the ring's message size
    wire = p2p.Wire(t)
    nbytes = n * wire.itemsize
    sent = received = 0
    p2p.device_sync(t)  # CUDA: the input must be written before MPI reads it

    # fold-in: the even rank of each of the first rem pairs hands its whole vector to the odd one
    if r < 2 * rem:
        if newrank < 0:
            reqs = p2p.send_segments(comm, r + 1, wire, 0, n, seg, _TAG_FOLD)
            MPI.Request.Waitall(reqs)  # blocks on r+1 taking our vector
            sent += nbytes
        else:
            received += p2p.recv_reduce_segments(comm, r - 1, t, 0, n, seg, _TAG_FOLD)

    if newrank >= 0:
        # recursive halving: owned block range [lo_block, hi_block) of core blocks halves each step
        lo_block, hi_block = 0, core
        mask = core >> 1
        while mask:
            partner = p2p.core_to_rank(newrank ^ mask, rem)
            mid_block = (lo_block + hi_block) // 2
            lower = _block_range(n, core, lo_block, mid_block - lo_block)
            upper = _block_range(n, core, mid_block, hi_block - mid_block)
            keep_lower = not newrank & mask
            keep, give = (lower, upper) if keep_lower else (upper, lower)
            s, rcv = p2p.exchange_reduce(comm, partner, t, wire, send=give, recv=keep, seg=seg, tag=_TAG_HALVING)
            p2p.device_sync(t)  # CUDA: the adds into `keep` must land before it is sent next step
            sent += s
            received += rcv
            lo_block, hi_block = (lo_block, mid_block) if keep_lower else (mid_block, hi_block)
            mask >>= 1

        # recursive doubling: swap owned ranges with the partner, received straight into place
        # (as segments: see p2p.exchange for why one huge message is not used)
        mask = 1
        while mask < core:
            partner_new = newrank ^ mask
            partner = p2p.core_to_rank(partner_new, rem)
            mine = _block_range(n, core, (newrank // mask) * mask, mask)
            theirs = _block_range(n, core, (partner_new // mask) * mask, mask)
            s, rcv = p2p.exchange(comm, partner, wire, send=mine, recv=theirs, seg=seg, tag=_TAG_DOUBLING)
            sent += s
            received += rcv
            mask <<= 1

    # unfold: the odd rank of each pair returns the finished vector to its even partner
    if r < 2 * rem:
        if newrank < 0:
            comm.Recv(wire.seg(0, n), r + 1, _TAG_UNFOLD)  # blocks on r+1 finishing the reduction
            received += nbytes
        else:
            comm.Send(wire.seg(0, n), r - 1, _TAG_UNFOLD)  # blocks until r-1 has taken it
            sent += nbytes
    world.traffic.add(sent=sent, received=received)
    return common.finish(t, p, op)


def _block_range(n: int, core: int, first_block: int, nblocks: int) -> tuple[int, int]:
    return shard_bounds(n, core, first_block)[0], shard_bounds(n, core, first_block + nblocks - 1)[1]
