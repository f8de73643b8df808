"""Point-to-point plumbing shared by mpilm's hand-written collectives (ring, rhd, tree).

What it does:
- ``group(comm)`` / ``private_comm(comm)``: a duplicate of ``comm`` (cached on it as an MPI
  attribute, freed with it) so the collectives' messages live in their own context and never
  match a user's receive, plus what every call would otherwise recompute: size, rank, and the
  power-of-two fold-in (``fold_in``) that ``rhd`` and ``tree`` share.
- ``Wire``: one tensor's zero-copy MPI view; ``wire.seg(lo, hi)`` is the ``[memory, count, type]``
  spec of elements ``[lo, hi)`` (an address-based buffer on the host, the tensor itself on CUDA;
  no copies).
- ``scratch(like, n, slot)``: segment-sized receive buffers (``common.scratch``) with their
  ``Wire``, cached per (thread, device, dtype, slot, size), so hot paths neither allocate nor
  re-derive buffer specs.
- ``send_segments`` / ``recv_segments`` / ``recv_reduce_segments`` / ``exchange_reduce``: a range
  sent as segments, received as segments straight into place,
  and a range received segment by segment into a small window of scratch buffers and added into
  its destination while the next segments are still in flight.
- ``exchange``: a swap of two disjoint ranges with a peer, received straight into place, cut into
  segments when it is longer than one (the allgather half of ``rhd``).
- ``device_sync(t)``: waits for queued CUDA work on ``t`` before MPI reads or rewrites it.

How a range is cut into messages (``common.segments``), the divide of ``op="avg"``
(``common.finish``) and the argument checks live in ``common.py``.

What it does not: choose algorithms (``collectives.py``) or count traffic: functions that move
bytes return them and each algorithm adds its totals to ``world.traffic`` once.

Threads: the private duplicate is cached on its communicator (an MPI attribute), the scratch
buffers per thread, so a communication thread and the main thread may each run collectives on
their own communicator at the same time (MPI must then grant ``MPI_THREAD_MULTIPLE``).

Limits: messages on one private communicator are matched in posting order (MPI's non-overtaking
rule), so a collective must not run concurrently with another one on the same communicator from a
second thread (the same rule MPI applies to its own collectives).
"""

from __future__ import annotations

import threading
import time

import torch
from mpi4py import MPI

from mpilm.comm import common, world
from mpilm.comm.common import segments

# Receive window: how many segment receives are posted ahead of the one being added. Two is
# double buffering (add segment k while k+1 arrives); three absorbs jitter in the peer's pace.
RECV_WINDOW = 3

def wait(request: MPI.Request) -> None:
    """``request.Wait()``, or test-and-sleep on a thread that asked to ``common.poll_politely``."""
    sleep = common.polite_sleep()
    if sleep is None:
        request.Wait()
        return
    while not request.Test():
        time.sleep(sleep)


def waitall(requests: list) -> None:
    """``MPI.Request.Waitall(requests)``, or test-and-sleep as ``wait``."""
    sleep = common.polite_sleep()
    if sleep is None:
        MPI.Request.Waitall(requests)
        return
    while not MPI.Request.Testall(requests):
        time.sleep(sleep)

class Group:
    """One communicator as the algorithms see it, computed once and cached on the communicator.

    ``comm`` is a private duplicate of the user's communicator, so the collectives' messages live
    in their own context and never match a user's receive (what MPI libraries do internally for
    their own collectives). ``core``/``rem``/``newrank`` describe the power-of-two core used by
    ``rhd`` and ``tree`` (see ``fold_in``), ``doubling_partners`` the rank met at each
    recursive-doubling step (empty for ranks that sit out).
    """

    __slots__ = ("comm", "size", "rank", "core", "rem", "newrank", "doubling_partners")

    def __init__(self, private: MPI.Comm):
        self.comm = private
        self.size, self.rank = private.Get_size(), private.Get_rank()
        self.core, self.rem, self.newrank = fold_in(self.size, self.rank)
        self.doubling_partners = []
        if self.newrank >= 0:
            mask = 1
            while mask < self.core:
                self.doubling_partners.append(core_to_rank(self.newrank ^ mask, self.rem))
                mask <<= 1


def fold_in(p: int, r: int) -> tuple[int, int, int]:
    """``(p', rem, newrank)``: the power-of-two core p' <= p, rem = p - p', r's rank in the core.

    As in MPICH: each even rank below 2 rem hands its vector to the odd rank above it and sits out
    (newrank -1); odd ranks below 2 rem are core rank r // 2, the others r - rem.
    """
    core = 1 << (p.bit_length() - 1)
    rem = p - core
    if r < 2 * rem:
        return core, rem, (r // 2 if r % 2 else -1)
    return core, rem, r - rem


def core_to_rank(newrank: int, rem: int) -> int:
    """The rank of core member ``newrank`` (inverse of ``fold_in``)."""
    return 2 * newrank + 1 if newrank < rem else newrank + rem


def _free_group(comm: MPI.Comm, keyval: int, group: Group) -> None:
    group.comm.Free()  # the private duplicate goes when its communicator is freed


_GROUP_KEYVAL = MPI.Comm.Create_keyval(delete_fn=_free_group)


def group(comm: MPI.Comm) -> Group:
    """``comm``'s cached ``Group`` (collective on first use per communicator: it duplicates it)."""
    found = comm.Get_attr(_GROUP_KEYVAL)
    if found is None:
        found = Group(comm.Dup())  # collective over comm: every rank reaches its first collective together
        comm.Set_attr(_GROUP_KEYVAL, found)
    return found


def private_comm(comm: MPI.Comm) -> MPI.Comm:
    """``comm``'s private duplicate for collective traffic (collective on first use per comm)."""
    return group(comm).comm


class Wire:
    """Zero-copy MPI view of one contiguous tensor, sliced per message without touching torch.

    Host tensors are described by address (``MPI.buffer.fromaddress``, ~0.2 us against ~3 us for
    a numpy view: this is paid per message on the small-message path); device tensors go through
    ``world.buf`` (CUDA array interface). The Wire holds the tensor, so the memory outlives it.
    """

    __slots__ = ("tensor", "memory", "datatype", "itemsize", "on_host")

    def __init__(self, t: torch.Tensor):
        if not t.is_contiguous():
            raise ValueError("mpilm: MPI buffers must be contiguous tensors")
        self.tensor = t
        self.datatype = world.mpi_type(t.dtype)
        self.itemsize = t.element_size()
        self.on_host = not t.is_cuda
        if self.on_host:
            self.memory = MPI.buffer.fromaddress(t.data_ptr(), t.numel() * self.itemsize)
        else:
            self.memory = world.buf(t)[0]

    def seg(self, lo: int, hi: int) -> list:
        """``[memory, count, datatype]`` of elements ``[lo, hi)``."""
        if self.on_host:
            return [self.memory[lo * self.itemsize:hi * self.itemsize], hi - lo, self.datatype]
        return [self.memory[lo:hi], hi - lo, self.datatype]


_local = threading.local()
_MAX_CACHED_VIEWS = 256


def scratch(like: torch.Tensor, n: int, slot: int = 0, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, Wire]:
    """A reusable ``n``-element buffer and its ``Wire``, for receives and staging.

    The memory is ``common.scratch``'s (one allocation per thread, device, dtype and slot, grown
    when a larger ``n`` is asked for); the ``n``-element view and its MPI spec are cached per size
    too, so a hot loop neither allocates nor re-derives buffer specs. Per thread, so a
    communication thread and the main thread never share a buffer.
    """
    dtype = dtype or like.dtype
    views = getattr(_local, "views", None)
    if views is None:
        views = _local.views = {}
        _local.bases = {}
    key = (like.device, dtype, slot, n)
    hit = views.get(key)
    if hit is not None:
        return hit
    view = common.scratch(("p2p", slot), n, dtype, like.device)
    base_key = key[:3]
    base = view.untyped_storage().data_ptr()
    if _local.bases.get(base_key) != base or len(views) >= _MAX_CACHED_VIEWS:
        _local.bases[base_key] = base
        views.clear()  # views of an old allocation must not keep it alive from the cache
    hit = views[key] = (view, Wire(view))
    return hit


def device_sync(t: torch.Tensor) -> None:
    """Wait until queued CUDA work has written ``t`` (MPI reads device memory behind torch's back)."""
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()  # device sync: MPI must see finished data


def send_segments(comm: MPI.Comm, peer: int, wire: Wire, lo: int, hi: int, seg: int, tag: int) -> list:
    """Post nonblocking sends of ``[lo, hi)`` cut by ``segments``; the caller waits the requests."""
    return [comm.Isend(wire.seg(a, b), peer, tag) for a, b in segments(lo, hi, seg)]


def recv_segments(comm: MPI.Comm, peer: int, wire: Wire, lo: int, hi: int, seg: int, tag: int) -> list:
    """Post nonblocking receives of ``[lo, hi)`` straight into place, cut as ``send_segments`` cuts
    them; the caller waits the requests."""
    return [comm.Irecv(wire.seg(a, b), peer, tag) for a, b in segments(lo, hi, seg)]


def recv_reduce_segments(comm: MPI.Comm, peer: int, t: torch.Tensor, lo: int, hi: int, seg: int, tag: int) -> int:
    """Receive ``[lo, hi)`` from ``peer`` as segments and add them into ``t[lo:hi]``; returns bytes.

    At most ``RECV_WINDOW`` receives are in flight, each into its own scratch slot, so adding one
    segment overlaps the arrival of the next and no temporary larger than a segment exists.
    """
    parts = segments(lo, hi, seg)
    if not parts:
        return 0
    window = min(RECV_WINDOW, len(parts))
    width = parts[0][1] - parts[0][0]
    slots = [scratch(t, width, slot) for slot in range(window)]
    reqs = [comm.Irecv(slots[i][1].seg(0, b - a), peer, tag) for i, (a, b) in enumerate(parts[:window])]
    whole = len(parts) == 1 and lo == 0 and hi == t.numel()
    for i, (a, b) in enumerate(parts):
        k = i % window
        wait(reqs[k])  # blocks on peer: segment i has landed in slot k
        incoming = slots[k][0]
        (t if whole else t[a:b]).add_(incoming if b - a == width else incoming[: b - a])
        nxt = i + window
        if nxt < len(parts):
            # on CUDA the add above is only queued: it must have read slot k before MPI refills it
            device_sync(t)
            na, nb = parts[nxt]
            reqs[k] = comm.Irecv(slots[k][1].seg(0, nb - na), peer, tag)
    return (hi - lo) * t.element_size()


def exchange_reduce(comm: MPI.Comm, peer: int, t: torch.Tensor, wire: Wire,
                    send: tuple[int, int], recv: tuple[int, int], seg: int, tag: int) -> tuple[int, int]:
    """Send ``t[send]`` to ``peer`` while receiving ``peer``'s copy of ``t[recv]`` and adding it in.

    The two ranges must not overlap (the send buffer stays untouched until its requests finish).
    Returns ``(bytes sent, bytes received)``.
    """
    send_n, recv_n = send[1] - send[0], recv[1] - recv[0]
    if send_n <= seg and recv_n <= seg:
        # one message each way (the peer sees the same two lengths and decides alike): a single
        # blocking call has the least overhead, and there is nothing to pipeline
        incoming, incoming_wire = scratch(t, recv_n, 0)
        if t.is_cuda:
            device_sync(t)  # CUDA: the range sent must be written before MPI reads it
        comm.Sendrecv(wire.seg(*send), peer, tag, incoming_wire.seg(0, recv_n), peer, tag)  # blocks on peer
        t[recv[0]:recv[1]].add_(incoming)
        return send_n * wire.itemsize, recv_n * wire.itemsize
    sends = send_segments(comm, peer, wire, send[0], send[1], seg, tag)
    received = recv_reduce_segments(comm, peer, t, recv[0], recv[1], seg, tag)
    waitall(sends)  # blocks on peer: our send buffer is reusable once it has taken it all
    return (send[1] - send[0]) * wire.itemsize, received


def exchange(comm: MPI.Comm, peer: int, wire: Wire, send: tuple[int, int], recv: tuple[int, int],
             seg: int, tag: int) -> tuple[int, int]:
    """Send ``send`` of the wire's tensor to ``peer`` while its ``recv`` range lands in place.

    One message each way when both ranges fit in a segment (the peer sees the same lengths and
    decides alike). Longer ranges move as segments, every receive posted before the sends: on a
    TCP link one multi-megabyte rendezvous right after a segmented exchange ran at half the link
    rate (rhd at 16-64 MiB on the emulated 1 Gbit/s cluster), while the same bytes as segments
    keep it full. Returns ``(bytes sent, bytes received)``.
    """
    send_n, recv_n = send[1] - send[0], recv[1] - recv[0]
    if send_n <= seg and recv_n <= seg:
        comm.Sendrecv(wire.seg(*send), peer, tag, wire.seg(*recv), peer, tag)  # blocks on peer
    else:
        reqs = [comm.Irecv(wire.seg(a, b), peer, tag) for a, b in segments(recv[0], recv[1], seg)]
        reqs += send_segments(comm, peer, wire, send[0], send[1], seg, tag)
        waitall(reqs)  # blocks on peer: every segment of the swap has landed and left
    return send_n * wire.itemsize, recv_n * wire.itemsize
