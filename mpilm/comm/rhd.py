"""Rabenseifner's Allreduce: recursive-halving reduce-scatter + recursive-doubling allgather,
and those two halves on their own (``reduce_scatter``, ``allgather``: ZeRO-1's collectives).

Among a power-of-two group of p' ranks, the reduce-scatter takes lg p' steps: at step k a rank
swaps half of its current range with the partner whose rank differs in bit k (highest bit first),
keeps the half it owns and adds the partner's copy of it in. After lg p' steps core rank i owns
block i of p' blocks. The allgather retraces the steps in reverse, doubling the owned range each
time (received straight into place, no copies).

World sizes that are not a power of two fold in first (as MPICH does): with rem = p - p',
each even rank below 2 rem sends its whole buffer to the odd rank above it, which adds it and
stands for both; the even ranks sit out (``p2p.fold_in``). The phases (fold, halving, doubling,
hand-back) are shared by the three entry points:

- ``allreduce``: fold, halving, doubling, then the proxy returns the whole vector. Its core
  blocks are p' equal blocks (balanced steps), which need not be anyone's ``shard_bounds`` slice.
- ``reduce_scatter``: fold, halving, then each proxy sends its folded-out partner that rank's
  slice. Here core block i is exactly the ``shard_bounds(n, p, .)`` slices of the ranks core rank
  i stands for (both of a folded pair), so every rank ends up owning ``shard_bounds(n, p, r)``;
  at non-powers of two the folded pairs' blocks are twice as long (the price of that ownership).
- ``allgather``: each folded-out rank first sends its slice to its proxy, doubling over the
  same blocks, then the proxy sends back everything but that slice.
At power-of-two p, ``reduce_scatter`` + ``allgather`` send exactly the messages of
``allreduce``; elsewhere ``allreduce`` saves the two n/p hand-overs of the folded pairs, which is
why it runs the phases itself rather than calling the halves.

Cost (alpha-beta-gamma, n bytes): 2 lg p' alpha + 2 (p'-1)/p' n beta + (p'-1)/p' n gamma, plus
2 alpha + 2 n beta + n gamma on the fold-in pairs when p is not a power of two. So: the ring's
bandwidth term with only 2 lg p' latency steps instead of 2(p-1), which makes it the choice for
medium messages and for large ones at power-of-two p; the fold-in makes the ring better for very
large messages at other world sizes. Each half costs half of that.

Every transfer moves as segments of ``common.SEGMENT_BYTES``, the doubling and the hand-backs
too (``p2p.exchange``: one multi-megabyte message ran at half a TCP link's rate). Those added
into the buffer go through a small window of cached scratch slots (``p2p.exchange_reduce``), so
no temporary larger than a segment exists, also for the fold-in. Half types travel and add in
their own type, as in the ring (see ``ring.py``); results are bit-identical on all ranks (the
allgather copies owners' bytes).
"""

from __future__ import annotations

import functools

import torch
from mpi4py import MPI

from mpilm.comm import common, p2p, world
from mpilm.comm.common import shard_bounds

_TAG_FOLD = 21
_TAG_HALVING = 22
_TAG_DOUBLING = 23
_TAG_UNFOLD = 24
_TAG_SCATTER_OUT = 25  # reduce_scatter: a proxy hands its folded-out partner that rank's slice
_TAG_GATHER_IN = 26  # allgather: a folded-out rank hands its slice to its proxy


class _Call:
    """What every phase of one call needs: the group, the wire, the segment, the core blocks."""

    __slots__ = ("g", "comm", "t", "wire", "seg", "edges", "sent", "received")

    def __init__(self, t: torch.Tensor, g: p2p.Group, segment_bytes: int | None, by_rank: bool):
        self.g, self.comm, self.t = g, g.comm, t
        self.wire = p2p.Wire(t)
        self.seg = common.segment_elems(t.element_size(), segment_bytes)  # the ring's message size
        self.edges = _edges(t.numel(), g.size, g.core, g.rem, by_rank)
        self.sent = self.received = 0

    def block_range(self, first_block: int, nblocks: int) -> tuple[int, int]:
        return self.edges[first_block], self.edges[first_block + nblocks]

    def count(self, moved: tuple[int, int]) -> None:
        self.sent += moved[0]
        self.received += moved[1]


@functools.lru_cache(maxsize=256)
def _edges(n: int, p: int, core: int, rem: int, by_rank: bool) -> tuple[int, ...]:
    """Where each of the ``core`` blocks starts, then n: core block i is ``[edges[i], edges[i+1])``.

    ``by_rank`` (the halves): core block i is the ``shard_bounds(n, p, .)`` slices of the ranks
    core rank i stands for (ranks 2i and 2i+1 for i < rem, else rank i + rem), so the blocks of
    the folded pairs are twice as long. Otherwise (allreduce) ``core`` equal blocks."""
    if by_rank:
        return tuple(shard_bounds(n, p, 2 * i if i < rem else i + rem)[0] for i in range(core)) + (n,)
    return tuple(shard_bounds(n, core, i)[0] for i in range(core)) + (n,)


def _recv_ranges(c: _Call, peer: int, ranges, tag: int) -> list:
    """Nonblocking receives of ``ranges`` of ``c.t`` straight into place, as segments."""
    return [req for lo, hi in ranges for req in p2p.recv_segments(c.comm, peer, c.wire, lo, hi, c.seg, tag)]


def _send_ranges(c: _Call, peer: int, ranges, tag: int) -> list:
    return [req for lo, hi in ranges for req in p2p.send_segments(c.comm, peer, c.wire, lo, hi, c.seg, tag)]


def _nbytes(c: _Call, ranges) -> int:
    return sum(hi - lo for lo, hi in ranges) * c.wire.itemsize


def _fold(c: _Call) -> None:
    """The even rank of each of the first rem pairs hands its whole vector to the odd one, which adds it."""
    g, n = c.g, c.t.numel()
    if g.rank >= 2 * g.rem:
        return
    if g.newrank < 0:
        p2p.waitall(p2p.send_segments(c.comm, g.rank + 1, c.wire, 0, n, c.seg, _TAG_FOLD))  # blocks on r+1
        c.count((n * c.wire.itemsize, 0))
    else:
        c.count((0, p2p.recv_reduce_segments(c.comm, g.rank - 1, c.t, 0, n, c.seg, _TAG_FOLD)))
        p2p.device_sync(c.t)  # CUDA: the adds must land before the halving sends from t


def _halving(c: _Call) -> None:
    """Recursive halving among the core: core rank i ends up holding the sum of core block i."""
    g = c.g
    lo_block, hi_block = 0, g.core
    mask = g.core >> 1
    while mask:
        partner = p2p.core_to_rank(g.newrank ^ mask, g.rem)
        mid_block = (lo_block + hi_block) // 2
        lower = c.block_range(lo_block, mid_block - lo_block)
        upper = c.block_range(mid_block, hi_block - mid_block)
        keep_lower = not g.newrank & mask
        keep, give = (lower, upper) if keep_lower else (upper, lower)
        c.count(p2p.exchange_reduce(c.comm, partner, c.t, c.wire, send=give, recv=keep, seg=c.seg, tag=_TAG_HALVING))
        p2p.device_sync(c.t)  # CUDA: the adds into `keep` must land before it is sent next step
        lo_block, hi_block = (lo_block, mid_block) if keep_lower else (mid_block, hi_block)
        mask >>= 1


def _doubling(c: _Call) -> None:
    """Recursive doubling among the core: owned block ranges swapped, received straight into place
    (as segments: see ``p2p.exchange`` for why one huge message is not used)."""
    g = c.g
    mask = 1
    while mask < g.core:
        partner_new = g.newrank ^ mask
        partner = p2p.core_to_rank(partner_new, g.rem)
        mine = c.block_range((g.newrank // mask) * mask, mask)
        theirs = c.block_range((partner_new // mask) * mask, mask)
        c.count(p2p.exchange(c.comm, partner, c.wire, send=mine, recv=theirs, seg=c.seg, tag=_TAG_DOUBLING))
        mask <<= 1


def _to_folded_out(c: _Call, ranges, tag: int) -> None:
    """The odd rank of each fold pair sends ``ranges`` of its finished vector to its even partner."""
    g = c.g
    if g.rank >= 2 * g.rem:
        return
    peer = g.rank + 1 if g.newrank < 0 else g.rank - 1
    if len(ranges) == 1 and ranges[0][1] - ranges[0][0] <= c.seg:  # one message: the cheapest calls
        if g.newrank < 0:
            c.comm.Recv(c.wire.seg(*ranges[0]), peer, tag)  # blocks on r+1 finishing
            c.count((0, _nbytes(c, ranges)))
        else:
            c.comm.Send(c.wire.seg(*ranges[0]), peer, tag)  # blocks until r-1 has taken it
            c.count((_nbytes(c, ranges), 0))
        return
    if g.newrank < 0:
        p2p.waitall(_recv_ranges(c, peer, ranges, tag))  # blocks on r+1 finishing
        c.count((0, _nbytes(c, ranges)))
    else:
        p2p.waitall(_send_ranges(c, peer, ranges, tag))  # blocks until r-1 has taken it
        c.count((_nbytes(c, ranges), 0))


def _pair_slice(c: _Call) -> tuple[int, int]:
    """The ``shard_bounds`` slice of the even rank of this rank's fold pair."""
    return shard_bounds(c.t.numel(), c.g.size, c.g.rank - (c.g.rank % 2))


def allreduce(t: torch.Tensor, comm: MPI.Comm, op: str = "avg", segment_bytes: int | None = None) -> torch.Tensor:
    """Rabenseifner Allreduce of ``t`` over ``comm`` in place; returns ``t``."""
    common.check_op(op, "rhd")
    g = p2p.group(comm)
    if g.size == 1 or t.numel() == 0:
        return common.finish(t, g.size, op)
    c = _Call(t, g, segment_bytes, by_rank=False)
    p2p.device_sync(t)  # CUDA: the input must be written before MPI reads it
    _fold(c)
    if g.newrank >= 0:
        _halving(c)
        _doubling(c)
    _to_folded_out(c, ((0, t.numel()),), _TAG_UNFOLD)  # the whole finished vector
    world.traffic.add(sent=c.sent, received=c.received)
    return common.finish(t, g.size, op)


def reduce_scatter(t: torch.Tensor, comm: MPI.Comm, op: str = "avg", segment_bytes: int | None = None) -> torch.Tensor:
    """Recursive-halving reduce-scatter: rank r's ``shard_bounds(n, p, r)`` slice of ``t`` ends up
    holding the sum (or average) over ``comm``; returns that view. The rest of ``t`` holds partial
    sums. Any p: the fold-in as for ``allreduce``, then each proxy sends its folded-out partner
    that rank's slice (n/p elements, the only extra step)."""
    common.check_op(op, "rhd.reduce_scatter")
    g = p2p.group(comm)
    lo, hi = shard_bounds(t.numel(), g.size, g.rank)
    if g.size == 1 or t.numel() == 0:
        return common.finish(t[lo:hi], g.size, op)
    c = _Call(t, g, segment_bytes, by_rank=True)
    p2p.device_sync(t)  # CUDA: the input must be written before MPI reads it
    _fold(c)
    if g.newrank >= 0:
        _halving(c)
    _to_folded_out(c, (_pair_slice(c),), _TAG_SCATTER_OUT)
    world.traffic.add(sent=c.sent, received=c.received)
    return common.finish(t[lo:hi], g.size, op)


def allgather(t: torch.Tensor, comm: MPI.Comm, segment_bytes: int | None = None) -> torch.Tensor:
    """Recursive-doubling allgather: every rank's ``shard_bounds`` slice of ``t`` is filled from
    its owner, in place (received straight into place); returns ``t``. Any p: each folded-out rank
    first hands its slice to its proxy, and gets back everything else at the end."""
    g = p2p.group(comm)
    n = t.numel()
    if g.size == 1 or n == 0:
        return t
    c = _Call(t, g, segment_bytes, by_rank=True)
    p2p.device_sync(t)  # CUDA: our own slice must be final before MPI reads it
    if g.rank < 2 * g.rem:  # the folded-out rank's slice goes to its proxy first
        pair = (_pair_slice(c),)
        if g.newrank < 0:
            p2p.waitall(_send_ranges(c, g.rank + 1, pair, _TAG_GATHER_IN))  # blocks on r+1 taking it
            c.count((_nbytes(c, pair), 0))
        else:
            p2p.waitall(_recv_ranges(c, g.rank - 1, pair, _TAG_GATHER_IN))  # blocks on r-1
            c.count((0, _nbytes(c, pair)))
    if g.newrank >= 0:
        _doubling(c)
    if g.rank < 2 * g.rem:  # everything but the folded-out rank's own slice goes back to it
        lo, hi = _pair_slice(c)
        _to_folded_out(c, ((0, lo), (hi, n)), _TAG_UNFOLD)
    world.traffic.add(sent=c.sent, received=c.received)
    return t
