"""Allreduce of device (CUDA) buffers through pinned host memory, for MPI libraries that cannot
take device pointers (``world.cuda_aware()`` is False). With a CUDA-aware MPI the collectives hand
CUDA tensors to MPI directly and this module is not used.

``allreduce_staged(buf, comm, algorithm, op)`` runs a staged ring whose wire buffers are two
pinned host buffers of one chunk (n/p elements) each and whose accumulator is the device tensor
itself; every chunk is cut into segments of ``segment_bytes`` and pipelined:

- segment k+1 is copied device->host on a side stream while segment k is on the wire;
- a received segment is copied host->device and added into ``buf`` *on the device* (torch ops on
  the caller's stream) while the next segments are still arriving, then copied back to host for
  the next step as soon as the add is done;
- in the allgather half a received segment is forwarded from host memory as it is (no device
  round trip), and its host->device copy overlaps the transfer.
Every ``algorithm`` runs this staged ring, except ``mpi``, which stages each segment to host
and runs the library's own ``MPI_Allreduce`` on it there (the baseline, so benchmarks still
compare mpilm against the library on GPU data; its sums are computed on the host by MPI).
``shm``/``hier`` have no device variant: CUDA IPC between the GPUs of a node is not implemented,
so GPUs on one node meet in host memory through this ring.

The same code runs with CPU tensors, the host playing the device: copies are then plain
synchronous copies and the stream/event steps do nothing. That is how the pipeline is tested on
machines without a GPU (``tests/test_shm_hier.py``); ``tests/gpu/`` repeats the checks with CUDA.

Half types travel and are added in their own dtype (one rounding per ring step, as NCCL does).
The call blocks until ``buf`` holds the result (the host buffers are reused by the next call).
Bytes handed to MPI are counted in ``world.traffic``. Host and device scratch buffers are
``common.scratch``'s (per thread, device, dtype; grown geometrically); messages travel on the
communicator's private duplicate (``p2p.private_comm``), as the other algorithms' do.
The halves (``reduce_scatter_staged`` / ``allgather_staged``, for ZeRO-1) take the simple road:
the whole buffer (or this rank's slice) to pinned host memory, a host half there (the ring's, or
the library's for ``mpi``: ``collectives`` passes it in, so this module imports no algorithm),
the result back; blocking copies, no pipelining.
``staged_algorithm(name)`` is the one place that says which staged pipeline a name runs; the
dispatcher (``collectives``) asks it.
"""

from __future__ import annotations

import threading

import torch
from mpi4py import MPI

from mpilm.comm import common, mpi, p2p, world
from mpilm.comm.common import segments, shard_bounds

_TAG = 0x5717


class _Device:
    """Copies between ``buf``'s device and host: CUDA streams and events, or plain host copies."""

    _copy_streams: dict = {}  # one side stream per (thread, device): threads never share one
    _lock = threading.Lock()

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            key = (threading.get_ident(), device)
            stream = _Device._copy_streams.get(key)
            if stream is None:
                with _Device._lock:
                    stream = _Device._copy_streams.setdefault(key, torch.cuda.Stream(device))
            self.copy = stream
            # device-side wait: copies out of buf start only after the work that produced it
            self.copy.wait_stream(self.compute)

    def to_host(self, host: torch.Tensor, source: torch.Tensor, after=None):
        """Queue ``host <- source`` on the side stream (after event ``after``); returns its event."""
        if not self.cuda:
            host.copy_(source)
            return None
        with torch.cuda.stream(self.copy):
            if after is not None:
                self.copy.wait_event(after)  # device-side wait for the add that produced source
            host.copy_(source, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy)
        return done

    def from_host(self, target: torch.Tensor, host: torch.Tensor, scratch: torch.Tensor, add: bool, divisor: int):
        """Queue ``target (+)= host`` (then ``/= divisor``) on the caller's stream; returns its event."""
        if add:
            scratch.copy_(host, non_blocking=True)
            target.add_(scratch)  # the reduction runs on the device
        else:
            target.copy_(host, non_blocking=True)
        if divisor > 1:
            target.div_(divisor)
        if not self.cuda:
            return None
        done = torch.cuda.Event()
        done.record(self.compute)
        return done

    @staticmethod
    def wait(event) -> None:
        if event is not None:
            event.synchronize()  # host blocks until the device has passed the event


def _scratch(kind: str, numel: int, like: torch.Tensor, pinned: bool) -> torch.Tensor:
    """A cached buffer of at least ``numel`` elements (per thread, device, dtype, kind)."""
    return common.scratch(("staging", kind), numel, like.dtype, like.device, pinned)


def staged_algorithm(algorithm: str) -> str:
    """Which staged pipeline ``algorithm`` runs: ``"mpi"`` (the library's allreduce on host
    segments) for ``mpi``, the staged ``"ring"`` for every other name (``auto`` included)."""
    return "mpi" if algorithm == "mpi" else "ring"


def allreduce_staged(buf: torch.Tensor, comm: MPI.Comm | None = None, algorithm: str = "ring", op: str = "avg",
                     segment_bytes: int | None = None) -> torch.Tensor:
    """Allreduce ``buf`` (CUDA, or CPU standing in for the device) in place through host memory.

    ``segment_bytes``: the pipelining grain (default ``common.SEGMENT_BYTES``).
    """
    comm = comm or world.WORLD
    common.check(buf, "allreduce_staged", op, algorithm)
    seg = common.segment_elems(buf.element_size(), segment_bytes)
    p = comm.Get_size()
    if p == 1 or buf.numel() == 0:
        return common.finish(buf, p, op)
    divisor = p if op == "avg" else 1
    if staged_algorithm(algorithm) == "mpi":
        _staged_library(buf, comm, divisor, seg)
    else:
        _staged_ring(buf, p2p.private_comm(comm), divisor, seg)
    return buf


def reduce_scatter_staged(buf: torch.Tensor, comm: MPI.Comm, host_half, op: str = "avg") -> torch.Tensor:
    """Reduce-scatter of a device buffer through host memory: ``buf`` is copied whole into a
    pinned host buffer, ``host_half(host, comm, op)`` (a host reduce-scatter, e.g.
    ``ring.reduce_scatter``) runs there, and this rank's ``shard_bounds`` slice is copied back;
    returns that view of ``buf`` (the rest of ``buf`` keeps its input). Not pipelined: two
    blocking copies around the host collective, which is simple and plainly right."""
    p, n = comm.Get_size(), buf.numel()
    lo, hi = shard_bounds(n, p, comm.Get_rank())
    if p == 1 or n == 0:
        return common.finish(buf[lo:hi], p, op)
    host = _scratch("halves", n, buf, pinned=True)
    host.copy_(buf)  # blocking: after the work that wrote buf (the caller's stream), then synchronised
    host_half(host, comm, op)  # blocks on every rank
    buf[lo:hi].copy_(host[lo:hi])  # blocking: host is free for the next call on return
    return buf[lo:hi]


def allgather_staged(buf: torch.Tensor, comm: MPI.Comm, host_half) -> torch.Tensor:
    """Allgather of a device buffer through host memory: this rank's ``shard_bounds`` slice goes
    to a pinned host buffer, ``host_half(host, comm)`` (a host allgather) fills the rest there,
    and the whole buffer is copied back; returns ``buf``. Not pipelined, as ``reduce_scatter_staged``."""
    p, n = comm.Get_size(), buf.numel()
    if p == 1 or n == 0:
        return buf
    lo, hi = shard_bounds(n, p, comm.Get_rank())
    host = _scratch("halves", n, buf, pinned=True)
    host[lo:hi].copy_(buf[lo:hi])  # blocking
    host_half(host, comm)  # blocks on every rank
    buf.copy_(host)  # blocking
    return buf


def _staged_library(buf: torch.Tensor, comm: MPI.Comm, divisor: int, seg: int) -> None:
    """Segment k+1 comes to host while the library allreduces segment k there; results go back."""
    n = buf.numel()
    device = _Device(buf.device)
    host = _scratch("library", n, buf, pinned=True)
    scratch = _scratch("device", 0, buf, pinned=False)
    ranges = segments(0, n, seg)
    on_host = [device.to_host(host[lo:hi], buf[lo:hi]) for lo, hi in ranges]  # all queued at once
    done = None
    for (lo, hi), event in zip(ranges, on_host):
        device.wait(event)  # host blocks until segment [lo, hi) has landed in host memory
        mpi.allreduce(host[lo:hi], comm, op="sum")  # blocks on every rank
        done = device.from_host(buf[lo:hi], host[lo:hi], scratch, add=False, divisor=divisor)
    device.wait(done)  # host blocks until buf holds the result and the host buffer is free


def _staged_ring(buf: torch.Tensor, comm: MPI.Comm, divisor: int, seg: int) -> None:
    """Ring reduce-scatter + allgather over host wire buffers, accumulating in ``buf`` on its device.

    Reduce-scatter step s (0 <= s < p-1): send chunk r-s, receive chunk r-s-1 and add it.
    Allgather step g (0 <= g < p-1): send chunk r+1-g, receive chunk r-g and store it.
    The chunk received at a step is the one sent at the next, so a received segment is queued for
    the next send as soon as it is added (reduce-scatter) or as it is (allgather).
    """
    p, r = comm.Get_size(), comm.Get_rank()
    n = buf.numel()
    right, left = (r + 1) % p, (r - 1) % p
    bounds = [shard_bounds(n, p, c) for c in range(p)]
    chunk = max(hi - lo for lo, hi in bounds)
    device = _Device(buf.device)
    hosts = [_scratch("wire0", chunk, buf, pinned=True), _scratch("wire1", chunk, buf, pinned=True)]
    scratch = _scratch("device", min(seg, chunk), buf, pinned=False)
    last_read = [None, None]  # per host buffer: event after the last device copy reading it
    send_i, recv_i = 0, 1
    steps = 2 * (p - 1)

    def chunks(step: int) -> tuple[int, int]:
        send = (r - step) % p if step < p - 1 else (r + 1 - (step - (p - 1))) % p
        return send, (send - 1) % p

    first_send = chunks(0)[0]
    lo0 = bounds[first_send][0]
    on_host = [device.to_host(hosts[send_i][lo - lo0 : hi - lo0], buf[lo:hi])
               for lo, hi in segments(*bounds[first_send], seg)]
    sent = received = 0
    for step in range(steps):
        reduce = step < p - 1
        send_c, recv_c = chunks(step)
        send_lo, recv_lo = bounds[send_c][0], bounds[recv_c][0]
        send_host, recv_host = hosts[send_i], hosts[recv_i]
        device.wait(last_read[recv_i])  # host blocks until older device copies stopped reading it
        receives = []
        for lo, hi in segments(*bounds[recv_c], seg):
            receives.append(comm.Irecv(world.buf(recv_host[lo - recv_lo : hi - recv_lo]), left, _TAG))
            received += (hi - lo) * buf.element_size()
        sends = []
        for (lo, hi), event in zip(segments(*bounds[send_c], seg), on_host):
            device.wait(event)  # host blocks until this segment has landed in host memory
            sends.append(comm.Isend(world.buf(send_host[lo - send_lo : hi - send_lo]), right, _TAG))
            sent += (hi - lo) * buf.element_size()
        on_host = []
        done = None
        for k, (lo, hi) in enumerate(segments(*bounds[recv_c], seg)):
            wire = recv_host[lo - recv_lo : hi - recv_lo]
            receives[k].Wait()  # blocks until the left neighbour's segment k has arrived
            divide = divisor if step == p - 2 else 1  # the last add completes the chunk
            done = device.from_host(buf[lo:hi], wire, scratch[: hi - lo], add=reduce, divisor=divide)
            if reduce:  # next step sends this chunk as reduced here: back to host after the add
                if k < len(sends):
                    sends[k].Wait()  # blocks until the right neighbour took what this slot held
                on_host.append(device.to_host(send_host[lo - recv_lo : hi - recv_lo], buf[lo:hi], after=done))
        last_read[recv_i] = done
        MPI.Request.Waitall(sends)  # blocks until the right neighbour has every segment of this step
        if not reduce and step < steps - 1:
            # allgather: forward the received bytes straight from host memory next step
            send_i, recv_i = recv_i, send_i
            on_host = [None] * len(segments(*bounds[recv_c], seg))
    world.traffic.add(sent=sent, received=received)
    device.wait(last_read[0])  # host blocks until buf holds the result: both
    device.wait(last_read[1])  # host buffers are then free for the next call
