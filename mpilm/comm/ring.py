"""Segmented, pipelined ring Allreduce and its two halves (reduce-scatter, allgather).

Rank r talks only to its neighbours: it sends to ``r+1`` and receives from ``r-1``. The buffer is
cut into p chunks by ``shard_bounds`` (rank r ends up owning chunk r) and every chunk into
segments of ``segment_bytes``:

- reduce-scatter, p-1 steps: at step s rank r receives chunk ``r-s-2`` segment by segment into a
  small window of scratch buffers, adds each one in place into its own copy, and forwards that
  reduced segment at once as part of step s+1. Step s+1 therefore starts while step s is still
  arriving (pipelined across steps), adding a segment overlaps the transfer of the next ones,
  and nothing larger than a segment is ever allocated (receive slots are cached).
- allgather, p-1 steps: every segment is received straight into its final place in the buffer
  (all receives posted up front, no copies) and forwarded as soon as it lands.
- when every chunk fits in one segment there is nothing to pipeline: each step is one blocking
  ``Sendrecv`` (the least Python and MPI overhead per step, which is what small buckets pay).

Cost (alpha-beta-gamma, n bytes, segment size S): 2(p-1) alpha + 2(p-1)/p n beta
+ (p-1)/p n gamma for an unsegmented ring; segmentation adds about ``n/S`` message latencies and
hides most of the gamma term and the per-step bubbles behind transfers. Bandwidth-optimal, so it
is the algorithm for large messages; latency grows linearly with p.

Half types (float16/bfloat16) travel and are added in their own type (torch computes each add in
fp32 and rounds once), as NCCL does: the wire carries 2 bytes per element and each element sees
p-1 roundings. Results are bit-identical on all ranks (the allgather copies the owner's bytes).

Limits: sender and receiver must use the same segment size (it is a replicated setting).
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from mpilm.comm import common, p2p, world
from mpilm.comm.common import segments, shard_bounds

# Messages are cut into segments of ``common.SEGMENT_BYTES`` (read at call time; override per
# call with ``segment_bytes=`` or in the bench with --segment-bytes).

_TAG_REDUCE_SCATTER = 11
_TAG_ALLGATHER = 12


class _Plan:
    """What both halves need to know about one call: computed once per allreduce."""

    __slots__ = ("p", "r", "right", "left", "seg", "wire", "chunk", "widest", "whole_chunks")

    def __init__(self, t: torch.Tensor, g: p2p.Group, segment_bytes: int | None, chunks=None):
        self.p, self.r = g.size, g.rank
        self.right, self.left = (self.r + 1) % self.p, (self.r - 1) % self.p
        self.seg = common.segment_elems(t.element_size(), segment_bytes)
        self.wire = p2p.Wire(t)
        n = t.numel()
        if chunks is None:
            self.chunk = [shard_bounds(n, self.p, c) for c in range(self.p)]
            self.widest = -(-n // self.p)
        else:  # rank c owns t[chunks[c]]: disjoint ranges, not necessarily adjacent (hier's halves)
            self.chunk = list(chunks)
            self.widest = max(hi - lo for lo, hi in self.chunk)
        # every chunk is one message: nothing to pipeline, so take the low-overhead path
        self.whole_chunks = self.widest <= self.seg


def reduce_scatter_sum(t: torch.Tensor, comm: MPI.Comm, segment_bytes: int | None = None,
                       chunks=None) -> None:
    """Sum ``t`` over ``comm`` so that rank r's ``shard_bounds`` slice holds the total (in place).

    The other slices are left holding partial sums. ``chunks``: rank c owns ``t[chunks[c][0]:
    chunks[c][1]]`` instead (one disjoint range per rank, the same list on every rank).
    """
    g = p2p.group(comm)
    if g.size == 1 or t.numel() == 0:
        return
    sent, received = _reduce_scatter(t, g.comm, _Plan(t, g, segment_bytes, chunks))
    world.traffic.add(sent=sent, received=received)


def reduce_scatter(t: torch.Tensor, comm: MPI.Comm, op: str = "avg", segment_bytes: int | None = None) -> torch.Tensor:
    """Ring reduce-scatter onto this rank's ``shard_bounds`` slice; returns that view of ``t``."""
    common.check_op(op, "ring.reduce_scatter")
    p, r = comm.Get_size(), comm.Get_rank()
    lo, hi = shard_bounds(t.numel(), p, r)
    reduce_scatter_sum(t, comm, segment_bytes)  # nothing to do on one rank or an empty buffer
    return common.finish(t[lo:hi], p, op)


def allgather(t: torch.Tensor, comm: MPI.Comm, segment_bytes: int | None = None, chunks=None) -> torch.Tensor:
    """Fill every slice of ``t`` from its owner (rank r owns ``shard_bounds`` slice r, or
    ``chunks[r]`` when given), in place; returns ``t``."""
    g = p2p.group(comm)
    if g.size == 1 or t.numel() == 0:
        return t
    sent, received = _allgather(t, g.comm, _Plan(t, g, segment_bytes, chunks))
    world.traffic.add(sent=sent, received=received)
    return t


def allreduce(t: torch.Tensor, comm: MPI.Comm, op: str = "avg", segment_bytes: int | None = None) -> torch.Tensor:
    """Ring Allreduce of ``t`` over ``comm`` in place; returns ``t``."""
    common.check_op(op, "ring")
    g = p2p.group(comm)
    if g.size == 1 or t.numel() == 0:
        return common.finish(t, g.size, op)
    plan = _Plan(t, g, segment_bytes)
    sent, received = _reduce_scatter(t, g.comm, plan)
    more_sent, more_received = _allgather(t, g.comm, plan)
    world.traffic.add(sent=sent + more_sent, received=received + more_received)
    return common.finish(t, g.size, op)


def _reduce_scatter(t: torch.Tensor, comm: MPI.Comm, plan: _Plan) -> tuple[int, int]:
    p, r, seg, wire, chunk = plan.p, plan.r, plan.seg, plan.wire, plan.chunk
    right, left = plan.right, plan.left
    if plan.whole_chunks:
        return _reduce_scatter_whole_chunks(t, comm, plan)
    # every (step, segment) this rank receives, in the order its left neighbour sends them
    units = [(s, a, b) for s in range(p - 1) for a, b in segments(*chunk[(r - s - 2) % p], seg)]
    p2p.device_sync(t)  # CUDA: the gradients must be written before MPI reads them
    first = chunk[(r - 1) % p]
    sends = p2p.send_segments(comm, right, wire, first[0], first[1], seg, _TAG_REDUCE_SCATTER)
    sent = (first[1] - first[0]) * wire.itemsize
    received = 0
    if units:
        window = min(p2p.RECV_WINDOW, len(units))
        width = max(b - a for _, a, b in units)
        slots = [p2p.scratch(t, width, k) for k in range(window)]
        recvs = [comm.Irecv(slots[k][1].seg(0, b - a), left, _TAG_REDUCE_SCATTER)
                 for k, (_, a, b) in enumerate(units[:window])]
        for i, (s, a, b) in enumerate(units):
            k = i % window
            p2p.wait(recvs[k])  # blocks on the left neighbour: segment i is in slot k
            incoming = slots[k][0]
            t[a:b].add_(incoming if b - a == width else incoming[: b - a])
            received += (b - a) * wire.itemsize
            if s < p - 2 or i + window < len(units):
                p2p.device_sync(t)  # CUDA: the add must be done before MPI sends t[a:b] or refills slot k
            if s < p - 2:
                # this segment is now the partial sum the right neighbour adds at step s+1
                sends.append(comm.Isend(wire.seg(a, b), right, _TAG_REDUCE_SCATTER))
                sent += (b - a) * wire.itemsize
            nxt = i + window
            if nxt < len(units):
                _, na, nb = units[nxt]
                recvs[k] = comm.Irecv(slots[k][1].seg(0, nb - na), left, _TAG_REDUCE_SCATTER)
    p2p.waitall(sends)  # blocks on the right neighbour: it has taken every segment we sent
    return sent, received


def _allgather(t: torch.Tensor, comm: MPI.Comm, plan: _Plan) -> tuple[int, int]:
    p, r, seg, wire, chunk = plan.p, plan.r, plan.seg, plan.wire, plan.chunk
    right, left = plan.right, plan.left
    if plan.whole_chunks:
        return _allgather_whole_chunks(t, comm, plan)
    # receives land directly in their final place; post them all before anything can arrive late
    units = [(s, a, b) for s in range(p - 1) for a, b in segments(*chunk[(r - s - 1) % p], seg)]
    recvs = [comm.Irecv(wire.seg(a, b), left, _TAG_ALLGATHER) for _, a, b in units]
    p2p.device_sync(t)  # CUDA: our own slice must be final before MPI reads it
    own = chunk[r]
    sends = p2p.send_segments(comm, right, wire, own[0], own[1], seg, _TAG_ALLGATHER)
    sent = (own[1] - own[0]) * wire.itemsize
    # segments of the last step are only received, not forwarded: wait for them in one call
    forwarded = sum(1 for s, _, _ in units if s < p - 2)
    for i in range(forwarded):
        _, a, b = units[i]
        p2p.wait(recvs[i])  # blocks on the left neighbour: segment i is in place
        sends.append(comm.Isend(wire.seg(a, b), right, _TAG_ALLGATHER))
        sent += (b - a) * wire.itemsize
    # blocks on both neighbours: the last step has landed and the right one took all we sent
    p2p.waitall(recvs[forwarded:] + sends)
    received = sum(b - a for _, a, b in units) * wire.itemsize
    return sent, received


def _reduce_scatter_whole_chunks(t: torch.Tensor, comm: MPI.Comm, plan: _Plan) -> tuple[int, int]:
    """Reduce-scatter when every chunk is a single message: one blocking exchange per step.

    With nothing to pipeline, ``Sendrecv`` (one call, no request objects) is the cheapest way to
    move a chunk; on small buckets the Python overhead per step is the cost that shows.
    """
    p, r, wire, chunk = plan.p, plan.r, plan.wire, plan.chunk
    incoming, incoming_wire = p2p.scratch(t, plan.widest, 0)
    on_device = t.is_cuda
    sent = received = 0
    for s in range(p - 1):
        send_lo, send_hi = chunk[(r - s - 1) % p]
        recv_lo, recv_hi = chunk[(r - s - 2) % p]
        m = recv_hi - recv_lo
        if on_device:
            p2p.device_sync(t)  # CUDA: the chunk sent (the previous step's sum) must be written
        comm.Sendrecv(wire.seg(send_lo, send_hi), plan.right, _TAG_REDUCE_SCATTER,
                      incoming_wire.seg(0, m), plan.left, _TAG_REDUCE_SCATTER)  # blocks on both neighbours
        t[recv_lo:recv_hi].add_(incoming if m == plan.widest else incoming[:m])
        sent += send_hi - send_lo
        received += m
    return sent * wire.itemsize, received * wire.itemsize


def _allgather_whole_chunks(t: torch.Tensor, comm: MPI.Comm, plan: _Plan) -> tuple[int, int]:
    """Allgather when every chunk is a single message: one blocking exchange per step, in place."""
    p, r, wire, chunk = plan.p, plan.r, plan.wire, plan.chunk
    if t.is_cuda:
        p2p.device_sync(t)  # CUDA: our own slice must be final before MPI reads it
    sent = received = 0
    for s in range(p - 1):
        send_lo, send_hi = chunk[(r - s) % p]
        recv_lo, recv_hi = chunk[(r - s - 1) % p]
        comm.Sendrecv(wire.seg(send_lo, send_hi), plan.right, _TAG_ALLGATHER,
                      wire.seg(recv_lo, recv_hi), plan.left, _TAG_ALLGATHER)  # blocks on both neighbours
        sent += send_hi - send_lo
        received += recv_hi - recv_lo
    return sent * wire.itemsize, received * wire.itemsize
