"""Hierarchical allreduce for many nodes (``algorithm="hier"``): shared memory inside a node,
one allreduce per slice across nodes.

One call, on every node at once:
1. ``shm`` reduce-scatter inside the node: every node rank sums its region of the buffer
   straight from its node peers' shared memory (no network);
2. for each slice, the ranks that own that slice on every node allreduce it over the network,
   with ``ring.allreduce`` or ``rhd.allreduce`` on a cached slice communicator, in place in
   shared memory, then divide by the total number of ranks for ``avg``;
3. ``shm`` allgather inside the node: every rank copies the finished regions of its node peers.
Steps 1-3 are one ``shm.allreduce_split`` call with step 2 run between its reduce and gather
halves, so the buffer is copied into shared memory once (not at all if it came from
``shm.alloc_shared_buffer``).

Slice alignment with uneven nodes (e.g. ``-np 5`` with ``MPILM_RANKS_PER_NODE=2``: nodes of 2,
2 and 1 ranks): every node cuts the buffer into the same L slices, L = the largest number of
ranks on a node (slice j = ``shard_bounds(n, L, j)``), so slice j covers the same elements on
every node. Node rank i of a node with k ranks owns the contiguous run of slices
``shard_bounds(L, k, i)``: one slice each on full nodes, several on smaller ones (the lone rank
of the third node above owns both). Slice communicator j holds the owner of slice j on every node,
ordered by node; every rank walks its slices in increasing j, so a rank with several slices never
waits on a cycle. A smaller node's ranks carry more of the inter-node traffic: the price of uneven
nodes, paid only where they are uneven.

Byte accounting: step 2 is counted by ring/rhd in ``world.traffic.sent`` / ``received``; steps
1 and 3 read (and, with shared buffers, write) the node peers' shared memory, counted by ``shm``
in ``world.traffic.shm_read`` / ``shm_written``.

Limits: host memory (CUDA tensors raise ValueError here; ``collectives.allreduce(...,
"hier")`` runs the device ring for them, staged through host memory when MPI is not
CUDA-aware); the same length and dtype on every rank, as for any allreduce. Communicators are
created collectively on first use per (communicator, node layout) and cached.

Halves (``reduce_scatter`` / ``allgather``, for ZeRO-1): rank r owns ``shard_bounds(n, p, r)``
as with every other algorithm. Two-level (shm inside nodes, ring across) when the nodes are
equal and hold consecutive ranks in node order; any other layout runs the plain ring, since the
two levels' slices would not line up with the global ``shard_bounds`` order (see
``reduce_scatter``).

Imports: ``shm`` (public API only), ``ring``, ``rhd``, ``common``, ``world``; nothing above.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from mpi4py import MPI

from mpilm.comm import common, rhd, ring, shm, world
from mpilm.comm.common import shard_bounds

# slices below this size cross the network with recursive halving-doubling (fewer latencies),
# larger ones with the bandwidth-optimal ring
RHD_BELOW_BYTES = 64 << 10


class _Layout:
    """Node layout of one communicator and the slice communicators built on it."""

    def __init__(self, comm: MPI.Comm, node: MPI.Comm):
        self.comm, self.node = comm, node
        self.size = comm.Get_size()
        k, i = node.Get_size(), node.Get_rank()
        # identify each node by the lowest comm rank on it, and learn every node's size
        leader = np.array([comm.Get_rank()], dtype=np.int64)
        node.Allreduce(MPI.IN_PLACE, leader, op=MPI.MIN)
        mine = np.array([leader[0], k], dtype=np.int64)
        every = np.empty(2 * self.size, dtype=np.int64)
        comm.Allgather(mine, every)
        leaders = sorted(set(every[0::2].tolist()))
        self.nodes = len(leaders)
        node_index = leaders.index(int(leader[0]))
        self.slices = int(every[1::2].max())  # L: the largest node's rank count
        # the halves' two-level path needs equal nodes holding consecutive ranks, in node order
        sizes = every[1::2]
        here = int(comm.Get_rank() == node_index * k + i and (sizes == k).all())
        self.node_major = bool(comm.allreduce(here, op=MPI.MIN))  # cold path: pickle is fine
        self._pieces: dict[tuple, tuple] = {}
        # node rank q owns slices shard_bounds(L, k, q): a contiguous run, >= 1 slice each
        self.owned = [shard_bounds(self.slices, k, q) for q in range(k)]
        self.slice_comms: dict[int, MPI.Comm] = {}
        self._bounds: dict[int, tuple] = {}
        my_first, my_stop = self.owned[i]
        for j in range(self.slices):  # collective: every rank joins every Split, in the same order
            color = j if my_first <= j < my_stop else MPI.UNDEFINED
            sub = comm.Split(color, key=node_index)
            if sub != MPI.COMM_NULL:
                self.slice_comms[j] = sub

    def bounds(self, n: int) -> tuple[tuple[int, int], ...]:
        """Element range of the slices each node rank owns (the split ``shm`` reduces by)."""
        cached = self._bounds.get(n)
        if cached is None:
            if len(self._bounds) >= 256:
                self._bounds.clear()
            cached = self._bounds[n] = tuple(self.slice_range(n, first, stop) for first, stop in self.owned)
        return cached

    def slice_range(self, n: int, first: int, stop: int) -> tuple[int, int]:
        return shard_bounds(n, self.slices, first)[0], shard_bounds(n, self.slices, stop - 1)[1]

    def pieces(self, n: int, local: int) -> tuple:
        """The halves' plan on a node-major layout (N nodes of k ranks, rank = node * k + local):
        ``(per_node, across)``. ``per_node[q] = ((lo, hi), split)``: node q's ranks' slices
        ``[lo, hi)`` and, relative to lo, node rank i's part (the ``shard_bounds`` slice of rank
        q k + i); ``across[q]``: the slice of rank q k + local (what slice communicator ``local``,
        ordered by node, reduce-scatters / allgathers)."""
        key = (n, local)
        cached = self._pieces.get(key)
        if cached is None:
            if len(self._pieces) >= 256:
                self._pieces.clear()
            k, p = self.slices, self.size
            per_node = []
            for q in range(self.nodes):
                lo, hi = shard_bounds(n, p, q * k)[0], shard_bounds(n, p, q * k + k - 1)[1]
                parts = _Split(tuple((a - lo, b - lo) for a, b in (shard_bounds(n, p, q * k + i) for i in range(k))))
                per_node.append(((lo, hi), parts))
            across = tuple(shard_bounds(n, p, q * k + local) for q in range(self.nodes))
            cached = self._pieces[key] = (tuple(per_node), across)
        return cached


class _Split(tuple):
    """A fixed split for ``shm``'s ``*_split`` calls: the same regions whatever n (hashable)."""

    def bounds(self, n: int) -> tuple:
        return self


@functools.lru_cache(maxsize=None)
def _layout_cached(comm_handle: int, node_handle: int) -> _Layout:
    return _Layout(MPI.Comm.f2py(comm_handle), MPI.Comm.f2py(node_handle))


def _layout(comm: MPI.Comm) -> _Layout:
    node = world.node_comm(comm)  # cached per fake-node setting, so the key covers the layout
    return _layout_cached(comm.py2f(), node.py2f())


def _inter_node_algorithm(nbytes: int):
    return rhd if nbytes < RHD_BELOW_BYTES else ring


def allreduce(buf: torch.Tensor, comm: MPI.Comm | None = None, op: str = "avg") -> torch.Tensor:
    """Allreduce ``buf`` in place over ``comm`` (any number of nodes, even or uneven)."""
    shm.check(buf, op, "hier")
    comm = comm or world.WORLD
    p = comm.Get_size()
    n = buf.numel()
    if p == 1 or n == 0:
        return common.finish(buf, p, op)
    layout = _layout(comm)
    if layout.nodes == 1:
        return shm.allreduce(buf, comm, op)
    node_rank = layout.node.Get_rank()
    first, stop = layout.owned[node_rank]
    region_lo = layout.slice_range(n, first, stop)[0]

    def across_nodes(region: torch.Tensor) -> None:
        # my node's partial sums of my slices -> the global sums, one slice communicator per slice
        for j in range(first, stop):
            lo, hi = shard_bounds(n, layout.slices, j)
            piece = region[lo - region_lo : hi - region_lo]
            algorithm = _inter_node_algorithm(piece.numel() * piece.element_size())
            # blocks until the owners of slice j on every node have joined
            algorithm.allreduce(piece, layout.slice_comms[j], op="sum")
        if op == "avg":
            region.div_(p)

    # alone on my node, my buffer is the node's partial sum: allreduce_split runs across_nodes(buf)
    return shm.allreduce_split(buf, layout.node, layout, across_nodes)


# ---------------------------------------------------------------- the halves (ZeRO-1)
def reduce_scatter(buf: torch.Tensor, comm: MPI.Comm | None = None, op: str = "avg") -> torch.Tensor:
    """Reduce ``buf`` over ``comm`` so that rank r's ``shard_bounds(n, p, r)`` slice holds the
    result; returns that view (the rest holds partial sums or inputs).

    One node: ``shm.reduce_scatter``. Several nodes of k ranks each, ranks numbered node by node
    (rank = node * k + local, what ``mpirun`` places by default): for every node q, an ``shm``
    reduce-scatter of node q's ranks' slices, so that local rank i holds its node's partial sum
    of the slice of rank q k + i for every q; then the ranks with local index i (one per node)
    ring-reduce-scatter those N slices across nodes, rank (node j, local i) keeping the slice of
    rank j k + i: its own. So each element crosses the network once per node, not once per rank,
    and the N shm calls cost N x a few syncs. Other layouts (uneven nodes, ranks not node by
    node) give no such match between the two levels: they run ``ring.reduce_scatter`` over
    ``comm`` (correct, not node-aware). Host tensors only (CUDA: see ``collectives``).
    """
    shm.check(buf, op, "hier.reduce_scatter")
    comm = comm or world.WORLD
    p, n = comm.Get_size(), buf.numel()
    lo, hi = shard_bounds(n, p, comm.Get_rank())
    if p == 1 or n == 0:
        return common.finish(buf[lo:hi], p, op)
    layout = _layout(comm)
    if layout.nodes == 1:
        return shm.reduce_scatter(buf, comm, op)
    if not layout.node_major:
        return ring.reduce_scatter(buf, comm, op)
    local = layout.node.Get_rank()
    per_node, across = layout.pieces(n, local)
    if layout.node.Get_size() > 1:
        for (g_lo, g_hi), split in per_node:  # every node rank walks the nodes in the same order
            if g_hi > g_lo:
                shm.reduce_scatter_split(buf[g_lo:g_hi], layout.node, split)  # blocks on the node
    ring.reduce_scatter_sum(buf, layout.slice_comms[local], chunks=across)  # blocks on the other nodes
    return common.finish(buf[lo:hi], p, op)


def allgather(buf: torch.Tensor, comm: MPI.Comm | None = None) -> torch.Tensor:
    """Fill every rank's ``shard_bounds(n, p, r)`` slice of ``buf`` from rank r, in place;
    returns ``buf``. The reverse of ``reduce_scatter``: one node, ``shm.allgather``; node-major
    equal nodes, a ring allgather across nodes among the ranks with the same local index, then
    one ``shm`` allgather per node's slices; other layouts ``ring.allgather`` over ``comm``."""
    shm.check(buf, "sum", "hier.allgather")
    comm = comm or world.WORLD
    p, n = comm.Get_size(), buf.numel()
    if p == 1 or n == 0:
        return buf
    layout = _layout(comm)
    if layout.nodes == 1:
        return shm.allgather(buf, comm)
    if not layout.node_major:
        return ring.allgather(buf, comm)
    local = layout.node.Get_rank()
    per_node, across = layout.pieces(n, local)
    ring.allgather(buf, layout.slice_comms[local], chunks=across)  # blocks on the other nodes
    if layout.node.Get_size() > 1:
        for (g_lo, g_hi), split in per_node:
            if g_hi > g_lo:
                shm.allgather_split(buf[g_lo:g_hi], layout.node, split)  # blocks on the node
    return buf
