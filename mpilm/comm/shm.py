"""Single-node allreduce through an MPI-3 shared-memory window (``algorithm="shm"``).

How one call works, for the p ranks of one node (``world.node_comm(comm)``; fake nodes from
``MPILM_RANKS_PER_NODE`` are honoured):

1. a rank whose buffer is ordinary private memory copies what its peers will read into its
   segment of a persistent shared *scratch* window (nothing to copy when the buffer already lies
   in a shared window: see ``alloc_shared_buffer``); it describes the call (kind, length, dtype,
   where its input lies) in a small shared *control block* and arrives at sync 1. A mismatch
   between ranks' calls raises ValueError on every rank instead of corrupting data or hanging;
2. then, from what every rank published (so all ranks take the same protocol):
   - push (every input in a shared buffer): rank i reduces slice i (``shard_bounds(n, p, i)``)
     straight from its peers' memory and writes the result into its own buffer *and* into every
     peer's, block by block while it is in cache; sync 2 and done: nobody copies anything out;
   - one-shot (every input private, and at most ``ONESHOT_BYTES`` to read from the peers): every
     rank sums all whole inputs, in rank order (so every rank gets the same bits), into its own
     buffer; no second sync;
   - pull (otherwise, e.g. large private buffers): rank i reduces slice i into its buffer and
     publishes it in its scratch segment, sync 2, then copies the peers' reduced slices out; a
     sync 3 when some input is a shared buffer, which its owner may write again on return.
The scratch window has two halves used by alternate calls, so a rank may start copying in call
k+1 while a slow peer still reads call k (it can never be two calls behind: it would not have
passed sync 1 of call k+1). ``reduce_scatter`` and ``allgather`` take the same steps for one half.

Two implementations of that protocol, on the same memory and counters: ``kernels/mpilm_shm.cpp``
(the whole allreduce in one C++ call, GIL released; built with the other kernels, used when every
rank of the node has it) and this file's Python (numpy views of the windows; bfloat16, which
numpy lacks, through torch). Python also runs the halves, ``hier``'s calls, and any call whose
private input needs a larger scratch window. ``NATIVE = False`` forces Python (tests run both;
they give the same bits: same summation order, fp32 sums for the half types, divide last).

Synchronisation uses the window's own memory model: all windows stay in one ``Lock_all``
passive epoch, every sync is a memory fence (``Win.Sync`` / a C++ seq_cst fence) + an arrival
counter in the shared control block + a fence, and a rank waits by polling its peers' counters:
busy-polling like MPI libraries do, then yielding the core, then sleeping; only briefly busy
when the machine runs more of our ranks than it has cores. A sync costs well under a
microsecond in C++, about 1.2 us in Python, against 2-9 us for ``MPI_Barrier``.

Measured (2 ranks, float32, ``python -m mpilm.bench allreduce``, time ratio against MPICH's
allreduce; ``docs/figures/allreduce-shm*-np2``, C++ path): with the buffer from
``alloc_shared_buffer``, as training allocates it, 1.2x at 4 KiB, 2x at 64 KiB, 2.5-3.7x from
256 KiB to 16 MiB and 4.7-5.7x at 64-256 MiB; with the caller's private buffer, copied in,
1.3-1.9x up to 1 MiB, 1.0-1.2x at 4-16 MiB and 1.6-1.8x at 64-256 MiB: the copies in and out
cost memory bandwidth that the shared buffer saves. The Python path costs ~8 us more per call.

Windows are collective objects, cached per node communicator; the scratch window (2 x the
largest buffer seen) is reused by every call and replaced by one twice as large (the old one
freed with ``Win.Free``) only when a larger buffer arrives, so any number of calls of varying
sizes keep memory bounded. Everything left is freed at interpreter exit while MPI is still up.

Limits:
- one node only: a ``comm`` spanning several nodes raises ValueError (use ``hier``);
- host memory only: CUDA tensors raise ValueError here; ``collectives.allreduce(...,
  "shm")`` runs the device ring for them instead (staged through pinned host buffers when MPI is
  not CUDA-aware; ``collectives.algorithm_that_runs`` says so); CUDA IPC between GPUs of a node
  is not implemented;
- every rank must pass the same length and dtype (checked: a mismatch raises ValueError).

Traffic: shared-memory loads and stores are not MPI traffic (``world.traffic.sent`` /
``received`` stay put: the only MPI calls are the collective window creations), but they are
what ``shm`` moves between ranks, so every call adds to ``world.traffic.shm_read`` the bytes
this rank read out of its peers' shared memory and to ``shm_written`` the bytes it stored into
theirs, counted from the protocol the call took (``_moved``; the same on both paths, computed in
Python after the call): for n elements of e bytes on p ranks, where this rank's region has m:
one-shot reads (p-1) n e; push reads and writes (p-1) m e each; pull reads (p-1) m e to reduce
and (n-m) e to gather. Copies into this rank's own segment (a private input's copy-in, the
publish of pull) are not counted.
"""

from __future__ import annotations

import atexit
import os
import select
import time

import numpy as np
import torch
from mpi4py import MPI

from mpilm import kernels
from mpilm.comm import common, world
from mpilm.comm.common import shard_bounds

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPE_CODES = {dtype: code for code, dtype in enumerate(SUPPORTED_DTYPES, start=1)}
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}
_ELEMENT_SIZES = {torch.float32: 4, torch.float64: 8, torch.float16: 2, torch.bfloat16: 2}
_CACHE_ENTRIES = 256  # call shapes remembered (plans, splits); cleared when full

MIN_SCRATCH_BYTES = 1 << 20  # first scratch window; later ones double
REDUCE_BLOCK = 1 << 17  # elements summed, divided and published per pass, while in L2
# allreduces that read at most this many bytes of the peers' inputs (n x element size x (p-1))
# go one-shot: every rank sums every whole input, one sync instead of two (measured crossover)
ONESHOT_BYTES = 64 << 10
NATIVE = True  # allreduces through kernels/mpilm_shm.cpp when built; False: Python (same on every rank)
# Waiting for a peer: busy-poll (as MPI libraries do; giving the core away costs a scheduler
# time slice whenever anything else is runnable) for SPIN_BUSY_S, then poll with os.sched_yield
# until SPIN_YIELD_S, then sleep SPIN_SLEEP_S between polls. When this machine runs more of our
# ranks than it has cores, busy-polling steals the core a peer needs: spin only SPIN_SHARED_S.
SPIN_BUSY_S = 5e-3
SPIN_SHARED_S = 20e-6
SPIN_YIELD_S = 50e-3
SPIN_SLEEP_S = 50e-6
GIL_RELEASE_POLLS = 64  # busy-polls between GIL releases (a zero-timeout select: no sleep)

# control block: one 128-byte slot (two cache lines) of int64 words per node rank: the arrival
# counter, then two copies of the call description, used by alternate calls (a fast rank may
# describe call k+1 while a slow peer still reads call k; it cannot get further ahead)
_SLOT_WORDS = 16
_ARRIVED = 0
_WINDOW, _OFFSET, _SIGNATURE = range(3)  # words of one call description
_DESCRIPTION_BASE = (2, 8)  # where the two descriptions start in a slot
_SCRATCH = -1  # _WINDOW value: the input was copied into the scratch window
_GROWING = (-2, 0)  # published input: my scratch window is too small, every rank must grow it
_KINDS = {"allreduce": 1, "reduce_scatter": 2, "allgather": 3}
# the context words and return codes of kernels/mpilm_shm.cpp (mirrored there)
(_CTX_ARRIVALS, _CTX_CALLS, _CTX_SLOTS, _CTX_ME, _CTX_RANKS, _CTX_BASES, _CTX_BASE_ROWS,
 _CTX_SCRATCH_HALF_BYTES, _CTX_BUSY_NS, _CTX_YIELD_NS, _CTX_SLEEP_NS, _CTX_WORDS) = range(12)
_NATIVE_DONE, _NATIVE_MISMATCH, _NATIVE_GROW = 0, 1, 4
_KIND_NAMES = {code: name for name, code in _KINDS.items()}
_DTYPE_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in _DTYPE_CODES.items()}


class _SharedWindow:
    """One ``MPI.Win.Allocate_shared`` window: this rank's segment and its peers', kept locked."""

    def __init__(self, node: MPI.Comm, nbytes: int, contiguous: bool = False):
        info = MPI.Info.Create()
        if not contiguous:
            info.Set("alloc_shared_noncontig", "true")  # each segment on its owner's NUMA node
        self.win = MPI.Win.Allocate_shared(nbytes, 1, info, node)  # collective over the node
        info.Free()
        if self.win.Get_attr(MPI.WIN_MODEL) != MPI.WIN_UNIFIED:  # never seen; the fences rely on it
            raise RuntimeError("shm: this MPI library gives shared windows the separate memory model")
        self.win.Lock_all(MPI.MODE_NOCHECK)  # one passive epoch for the window's whole life
        self.nbytes = nbytes
        self._memory = [self.win.Shared_query(q)[0] for q in range(node.Get_size())]
        self._addresses = [MPI.Get_address(memory) for memory in self._memory]
        self._views: dict = {}

    def segment(self, q: int, dtype: torch.dtype, as_numpy: bool):
        """Rank q's whole segment as a flat numpy array (or torch tensor) of ``dtype``."""
        key = (q, dtype, as_numpy)
        view = self._views.get(key)
        if view is None:
            memory = self._memory[q]
            if as_numpy:
                view = np.frombuffer(memory, dtype=_NUMPY_DTYPES[dtype])
            else:
                view = torch.frombuffer(memory, dtype=dtype)
            self._views[key] = view
        return view

    def base_address(self, q: int) -> int:
        return self._addresses[q]

    def free(self) -> None:
        """Collective over the node. Views handed out before must not be used afterwards."""
        self._views.clear()
        self._memory.clear()
        self.win.Unlock_all()
        self.win.Free()  # collective: returns once every node rank has let go of the window


class _EvenSplit:
    """Node rank q owns ``shard_bounds(n, p, q)``: the split of ``shm`` and its halves."""

    def __init__(self, p: int):
        self.p = p
        self._bounds: dict[int, tuple] = {}

    def bounds(self, n: int) -> tuple[tuple[int, int], ...]:
        cached = self._bounds.get(n)
        if cached is None:
            if len(self._bounds) >= _CACHE_ENTRIES:
                self._bounds.clear()
            cached = self._bounds[n] = tuple(shard_bounds(n, self.p, q) for q in range(self.p))
        return cached


class _Shape:
    """The replicated facts of one kind of call (kind, split, length, dtype), cached."""

    __slots__ = ("n", "dtype", "signature", "lo", "hi", "bounds", "reduce", "gather", "as_numpy", "wide", "peer_bytes")


class _Plan:
    """What a call of one shape reads and writes in shared memory, given where every input lies;
    independent of the caller's tensor, so it is cached."""

    __slots__ = ("oneshot", "sources", "publish", "gather_from", "sync_after_reduce", "sync_after_gather",
                 "read_bytes", "written_bytes")


class _NodeGroup:
    """Shared state of the ranks of one node communicator: control block, scratch, user buffers."""

    def __init__(self, node: MPI.Comm):
        self.node = node
        self.me = node.Get_rank()
        self.p = node.Get_size()
        self.peers = [q for q in range(self.p) if q != self.me]
        self.description_bases = [[q * _SLOT_WORDS + first for q in range(self.p)] for first in _DESCRIPTION_BASE]
        self.even = _EvenSplit(self.p)
        # control block on node rank 0 only, so all slots lie in one contiguous array
        self.control = _SharedWindow(node, 8 * _SLOT_WORDS * self.p if self.me == 0 else 0, contiguous=True)
        self.slots = memoryview(self.control._memory[0]).cast("B").cast("q")
        if self.me == 0:
            for word in range(_SLOT_WORDS * self.p):
                self.slots[word] = 0
        self.control.win.Sync()
        node.Barrier()  # blocks until node rank 0 has zeroed the control block
        self.control.win.Sync()
        self.busy_s = SPIN_SHARED_S if _oversubscribed() else SPIN_BUSY_S
        # the context both paths share (kernels/mpilm_shm.cpp reads and updates it in place):
        # the arrival counter, the call counter (its parity picks the scratch half and the call
        # description a call uses), where the memory is, how to wait
        self.ctx = np.zeros(_CTX_WORDS, dtype=np.int64)
        self.ctx[_CTX_SLOTS] = self.control.base_address(0)
        self.ctx[_CTX_ME], self.ctx[_CTX_RANKS] = self.me, self.p
        self.default_busy_s = self.busy_s
        self.yield_s, self.sleep_s = SPIN_YIELD_S, SPIN_SLEEP_S
        self._waiting_as: object = "unset"  # the polite-sleep setting the wait fields were last set for
        self._wait_like_this_thread()
        self.ctx_address = self.ctx.ctypes.data
        self.bases = np.zeros(0, dtype=np.int64)  # segment addresses by (window row, rank)
        self.scratch: _SharedWindow | None = None
        self.buffers: dict[int, _SharedWindow] = {}  # alloc_shared_buffer windows, by id
        self.next_buffer_id = 0
        self.plans: dict[tuple, _Plan] = {}
        self.shapes: dict[tuple, _Shape] = {}
        self.scratch_halves: dict[torch.dtype, tuple] = {}  # this rank's two scratch halves, per dtype
        self.accumulator: torch.Tensor | None = None  # private fp32 sums for half types
        self.accumulator_numpy: np.ndarray | None = None
        self._changed()
        self.native = _native_module(node)  # collective: the C++ path, or None on every rank

    # ---------------------------------------------------------------- synchronisation
    def _wait_like_this_thread(self) -> None:
        """How this call waits for its peers: busy-poll, yield, sleep as above; or, on a thread that
        asked to ``common.poll_politely`` (a communication thread sharing cores with backward),
        test and sleep from the start. Both paths read the same fields (C++: ``ctx``)."""
        polite = common.polite_sleep()
        if polite == self._waiting_as:
            return
        self._waiting_as = polite
        if polite is None:
            self.busy_s, self.yield_s, self.sleep_s = self.default_busy_s, SPIN_YIELD_S, SPIN_SLEEP_S
        else:
            self.busy_s, self.yield_s, self.sleep_s = 0.0, 0.0, polite
        self.ctx[_CTX_BUSY_NS] = int(self.busy_s * 1e9)
        self.ctx[_CTX_YIELD_NS], self.ctx[_CTX_SLEEP_NS] = int(self.yield_s * 1e9), int(self.sleep_s * 1e9)

    def _fence(self) -> None:
        # Win.Sync is MPI's memory barrier for windows in the unified model (all of ours, checked
        # at creation): our stores to shared memory become visible before the counter store, and
        # our loads happen after seeing the peers' counters. One processor barrier covers every
        # window, so only the control window is synced.
        self.control.win.Sync()

    def arrive_and_wait(self) -> None:
        """Sync point: publish this rank's arrival, wait for every node peer to arrive too."""
        self._fence()
        self.ctx[_CTX_ARRIVALS] += 1
        target = int(self.ctx[_CTX_ARRIVALS])
        slots = self.slots
        slots[self.me * _SLOT_WORDS + _ARRIVED] = target
        for q in self.peers:
            word = q * _SLOT_WORDS + _ARRIVED
            if slots[word] >= target:
                continue
            # blocks until node peer q arrives: busy-poll, handing the GIL to other threads
            # every GIL_RELEASE_POLLS polls, then yield the core, then sleep between polls
            start = time.perf_counter()
            polls = 0
            while slots[word] < target:
                polls += 1
                if polls % GIL_RELEASE_POLLS:
                    continue
                waited = time.perf_counter() - start
                if waited < self.busy_s:
                    select.select((), (), (), 0)  # releases the GIL, returns at once
                elif waited < self.yield_s:
                    os.sched_yield()  # releases the GIL and the core
                else:
                    time.sleep(self.sleep_s)
        self._fence()

    def publish(self, where: tuple[int, int], signature: int) -> None:
        """Describe this call (the call counter's parity picks the copy) for the peers to check and read."""
        base = self.description_bases[self.parity()][self.me]
        slots = self.slots
        slots[base + _WINDOW], slots[base + _OFFSET] = where
        slots[base + _SIGNATURE] = signature

    def read_inputs(self, signature: int) -> tuple[tuple[int, int], ...]:
        """Every rank's published (window, offset); ValueError on every rank alike if calls differ."""
        slots, bases = self.slots, self.description_bases[self.parity()]
        for base in bases:
            if slots[base + _SIGNATURE] != signature:
                calls = "; ".join(f"node rank {q}: {_describe(slots[b + _SIGNATURE])}" for q, b in enumerate(bases))
                raise ValueError(f"shm: the ranks of a node called different collectives ({calls})")
        return tuple([(slots[base + _WINDOW], slots[base + _OFFSET]) for base in bases])

    # ---------------------------------------------------------------- memory
    def locate(self, buf: torch.Tensor) -> tuple[int, int] | None:
        """(window id, element offset) of ``buf`` in a shared buffer of this rank, else None."""
        if not self.buffers:
            return None
        address, nbytes = buf.data_ptr(), buf.numel() * buf.element_size()
        for window_id, window in self.buffers.items():
            base = window.base_address(self.me)
            if base <= address and address + nbytes <= base + window.nbytes:
                if (address - base) % buf.element_size():
                    return None
                return window_id, (address - base) // buf.element_size()
        return None

    def copy_in(self, local, shape: _Shape, whole: bool) -> tuple[int, int]:
        """Copy what the peers will read into this call's scratch half; ``_GROWING`` if too small.

        Scratch halves alternate between calls: a peer may still read the half of the previous
        call, but never the one before (it passed our sync 1 since).
        """
        n, dtype, lo, hi = shape.n, shape.dtype, shape.lo, shape.hi
        halves = self.scratch_halves.get(dtype)
        if halves is None:
            if self.scratch is None:
                return _GROWING
            half = self.scratch.nbytes // 2 // _ELEMENT_SIZES[dtype]
            segment = self.scratch.segment(self.me, dtype, dtype in _NUMPY_DTYPES)
            halves = self.scratch_halves[dtype] = (segment[:half], segment[half : 2 * half])
        parity = self.parity()
        target = halves[parity]
        if n > len(target):
            return _GROWING
        if whole:  # a small allreduce: the peers may sum my whole input (one-shot)
            _copy(target[:n], local)
        elif shape.reduce:  # the peers read the slices they reduce: all but mine
            if lo > 0:
                _copy(target[:lo], local[:lo])
            if hi < n:
                _copy(target[hi:n], local[hi:])
        elif hi > lo:  # the peers gather my slice
            _copy(target[lo:hi], local[lo:hi])
        return _SCRATCH, parity * len(target)

    def grow_scratch(self, nbytes: int) -> None:
        """Collective: replace the scratch window by one with two halves of >= nbytes each."""
        half = max(nbytes, MIN_SCRATCH_BYTES // 2, self.scratch.nbytes if self.scratch else 0)
        half = -(-half // 4096) * 4096
        if self.scratch is not None:
            self.scratch.free()  # collective; nobody reads it: all ranks passed sync 1 of this call
            self.scratch = None
        self.scratch = _SharedWindow(self.node, 2 * half)
        self._changed()

    def add_buffer(self, window: _SharedWindow) -> None:
        self.buffers[self.next_buffer_id] = window
        self.next_buffer_id += 1
        self._changed()

    def free_buffer(self, window_id: int) -> None:
        self.buffers.pop(window_id).free()  # collective over the node
        self._changed()

    def _changed(self) -> None:
        self.plans.clear()  # plans and halves hold views of windows that may be gone
        self.scratch_halves.clear()
        # row 0: the scratch segments, row w + 1: shared buffer w's (0: no such window)
        rows = 1 + (max(self.buffers) + 1 if self.buffers else 0)
        bases = np.zeros((rows, self.p), dtype=np.int64)
        windows = [(0, self.scratch)] + [(w + 1, window) for w, window in self.buffers.items()]
        for row, window in windows:
            if window is not None:
                bases[row] = [window.base_address(q) for q in range(self.p)]
        self.bases = bases.reshape(-1)  # kept referenced: the C++ path reads it by address
        self.ctx[_CTX_BASES], self.ctx[_CTX_BASE_ROWS] = self.bases.ctypes.data, rows
        self.ctx[_CTX_SCRATCH_HALF_BYTES] = self.scratch.nbytes // 2 if self.scratch else 0

    def accumulator_for(self, numel: int, as_numpy: bool):
        if self.accumulator is None or self.accumulator.numel() < numel:
            grown = max(numel, 2 * self.accumulator.numel() if self.accumulator is not None else 0)
            self.accumulator = torch.empty(grown, dtype=torch.float32)
            self.accumulator_numpy = self.accumulator.numpy()
        return self.accumulator_numpy if as_numpy else self.accumulator

    def windows(self) -> list[_SharedWindow]:
        return [self.control] + ([self.scratch] if self.scratch else []) + list(self.buffers.values())

    def free_all(self) -> None:
        for window in list(self.buffers.values()) + ([self.scratch] if self.scratch else []) + [self.control]:
            window.free()  # collective over the node
        self.buffers.clear()
        self.scratch = None
        self._changed()

    # ---------------------------------------------------------------- the collective
    def run(self, buf: torch.Tensor, kind: str, split, divisor: int, between=None) -> torch.Tensor:
        """Reduce this rank's region ``split.bounds(n)[me]`` and/or gather every region, in place.

        ``kind``: ``allreduce`` (both), ``reduce_scatter`` (reduce into ``buf[lo:hi]`` only) or
        ``allgather`` (gather only). ``between(region)``, if given, runs on this rank's reduced
        region (a CPU tensor view of ``buf``) before the peers read it: ``hier`` puts its
        inter-node allreduce there.
        """
        self._wait_like_this_thread()
        n, dtype = buf.numel(), buf.dtype
        shape = self.shapes.get((kind, split, n, dtype))
        if shape is None:
            shape = self._shape(kind, split, n, dtype)
        # small: one-shot if every input turns out to be private (replicated: length, dtype, p,
        # caller), so a private buffer is copied in whole
        small = 0 <= shape.peer_bytes <= ONESHOT_BYTES and between is None
        mine = self.locate(buf) if self.buffers else None
        code = None
        if NATIVE and self.native is not None and between is None and kind == "allreduce" and (
                mine is not None or n * _ELEMENT_SIZES[dtype] <= self.ctx[_CTX_SCRATCH_HALF_BYTES]):
            # the same protocol in C++; a private input that does not fit the scratch takes the
            # Python path on every rank (capacities are equal), which grows it
            window, offset = mine if mine is not None else (_SCRATCH, 0)
            code = self.native.shm_allreduce(buf.data_ptr(), n, _DTYPE_CODES[dtype], divisor, shape.signature,
                                             window, offset, ONESHOT_BYTES, self.ctx_address)
            if code == _NATIVE_DONE:
                self._count_native(shape, small)
                return buf
            if code != _NATIVE_GROW:
                self._native_failed(code, shape.signature)
            inputs = self.read_inputs(shape.signature)  # past sync 1; a peer waits for the growth
        if mine is not None:  # a view of my segment, already at hand (cheaper than buf.numpy())
            local = self.buffers[mine[0]].segment(self.me, dtype, shape.as_numpy)[mine[1] : mine[1] + n]
        else:
            local = buf.numpy() if shape.as_numpy else buf
        if code is None:
            self.ctx[_CTX_CALLS] += 1
            if mine is None:
                mine = self.copy_in(local, shape, small)
            self.publish(mine, shape.signature)
            self.arrive_and_wait()  # sync 1: every input lies in shared memory, its place published
            inputs = self.read_inputs(shape.signature)
        if _GROWING in inputs:
            # some scratch was too small; capacities are equal on all ranks, so all grow together
            self.grow_scratch(n * _ELEMENT_SIZES[dtype])
            if mine == _GROWING:
                mine = self.copy_in(local, shape, small)
            self.publish(mine, shape.signature)
            self.arrive_and_wait()  # sync 1 again, now with every input in place
            inputs = self.read_inputs(shape.signature)
        plan = self.plans.get((shape, inputs, small))
        if plan is None:
            plan = self._plan(shape, inputs, small)
        if plan.oneshot:
            # every input lies in the peers' scratch halves, which stay untouched until they pass
            # sync 1 of their next call: sum them all, in rank order, and nothing else to wait for
            self._reduce(local, plan.sources, divisor, shape.wide, ())
            world.traffic.add(shm_read=plan.read_bytes, shm_written=plan.written_bytes)
            return buf
        own = local[shape.lo : shape.hi]
        if shape.reduce:
            # my region, summed into buf itself (and into shared memory for the peers to read)
            self._reduce(own, [own, *plan.sources], divisor, shape.wide, () if between else plan.publish)
            if between is not None:
                between(torch.from_numpy(own) if shape.as_numpy else own)
                for destination in plan.publish:
                    _copy(destination, own)
        else:  # allgather: push my slice into the peers' shared buffers (when they all are)
            for destination in plan.publish:
                _copy(destination, own)
        if plan.sync_after_reduce:
            self.arrive_and_wait()  # sync 2: reduced regions ready (or pushed), the inputs all read
        for q_lo, q_hi, source in plan.gather_from:
            _copy(local[q_lo:q_hi], source)
        if plan.sync_after_gather:
            self.arrive_and_wait()  # sync 3: shared buffers are free again for their owners
        world.traffic.add(shm_read=plan.read_bytes, shm_written=plan.written_bytes)
        return buf

    def parity(self) -> int:
        return int(self.ctx[_CTX_CALLS]) & 1

    # ---------------------------------------------------------------- traffic
    def _moved(self, shape: _Shape, oneshot: bool, push: bool) -> tuple[int, int]:
        """``(bytes read from the peers' shared memory, bytes written into it)`` by this rank in
        one call of ``shape`` that took one-shot, push or (neither) pull: the protocol's shape."""
        e = _ELEMENT_SIZES[shape.dtype]
        if oneshot:  # every peer's whole input
            return (self.p - 1) * shape.n * e, 0
        mine = shape.hi - shape.lo
        reduced = (self.p - 1) * mine * e if shape.reduce else 0  # the peers' copies of my region
        if push:  # and my result (allgather: my own slice) stored into every peer's buffer
            return reduced, (self.p - 1) * mine * e
        return reduced + ((shape.n - mine) * e if shape.gather else 0), 0  # pull: the peers' regions

    def _count_native(self, shape: _Shape, small: bool) -> None:
        """Count a C++ allreduce: which protocol it took follows from where the inputs lay, which
        every rank published for this call (that copy of the descriptions stays put until every
        peer passed sync 1 of our next call)."""
        slots = self.slots
        private = [slots[base + _WINDOW] == _SCRATCH for base in self.description_bases[self.parity()]]
        oneshot = small and all(private)
        read, written = self._moved(shape, oneshot, not oneshot and not any(private))
        world.traffic.add(shm_read=read, shm_written=written)

    def _native_failed(self, code: int, signature: int) -> None:
        if code == _NATIVE_MISMATCH:
            self.read_inputs(signature)  # raises the ValueError, on every rank alike
        raise RuntimeError(f"shm: the C++ allreduce failed with code {code} "
                           f"(2: a peer named a shared window this rank does not know; 3: bad dtype)")

    def _shape(self, kind: str, split, n: int, dtype: torch.dtype) -> _Shape:
        shape = _Shape()
        shape.n, shape.dtype = n, dtype
        shape.signature = (n << 8) | (_DTYPE_CODES[dtype] << 4) | _KINDS[kind]
        shape.lo, shape.hi = split.bounds(n)[self.me]
        shape.bounds = split.bounds(n)
        shape.reduce, shape.gather = kind != "allgather", kind != "reduce_scatter"
        shape.as_numpy = dtype in _NUMPY_DTYPES
        shape.wide = common.is_half(dtype)
        # what one-shot would read of the peers' inputs; -1: not an allreduce, never one-shot
        shape.peer_bytes = n * _ELEMENT_SIZES[dtype] * (self.p - 1) if kind == "allreduce" else -1
        if len(self.shapes) >= _CACHE_ENTRIES:
            self.shapes.clear()
        self.shapes[(kind, split, n, dtype)] = shape
        return shape

    def _plan(self, shape: _Shape, inputs, small: bool) -> _Plan:
        """The protocol, from facts every rank sees alike after sync 1: every input shared: push;
        else small: one-shot (each private input was copied in whole); else pull."""
        n, lo, hi, bounds = shape.n, shape.lo, shape.hi, shape.bounds
        data = []
        for q, (window_id, offset) in enumerate(inputs):
            window = self.scratch if window_id == _SCRATCH else self.buffers[window_id]
            data.append(window.segment(q, shape.dtype, shape.as_numpy)[offset : offset + n])
        plan = _Plan()
        all_shared = all(window_id != _SCRATCH for window_id, _ in inputs)
        all_private = all(window_id == _SCRATCH for window_id, _ in inputs)
        plan.oneshot = small and all_private
        if plan.oneshot:  # every rank sums every whole input, in rank order: identical bits everywhere
            plan.sources, plan.publish, plan.gather_from = data, (), []
            plan.sync_after_reduce = plan.sync_after_gather = False
        elif all_shared and shape.gather:
            # push: every buffer is shared, so I write my reduced (or, for allgather, my own) slice
            # straight into the peers' buffers and nobody copies anything out afterwards; no peer
            # reads or writes my buffer once sync 2 is passed, so there is no sync 3
            plan.sources = [data[q][lo:hi] for q in self.peers] if shape.reduce else []
            plan.publish = [data[q][lo:hi] for q in self.peers] if hi > lo else []
            plan.gather_from = []
            plan.sync_after_reduce, plan.sync_after_gather = True, False
        else:  # pull: my reduced slice goes where the peers read it; I read theirs after sync 2
            plan.sources = [data[q][lo:hi] for q in self.peers] if shape.reduce else []
            private = inputs[self.me][0] == _SCRATCH
            plan.publish = [data[self.me][lo:hi]] if shape.reduce and shape.gather and private else []
            plan.gather_from = [(bounds[q][0], bounds[q][1], data[q][bounds[q][0] : bounds[q][1]])
                                for q in self.peers if shape.gather and bounds[q][1] > bounds[q][0]]
            plan.sync_after_reduce = shape.reduce and (shape.gather or not all_private)
            plan.sync_after_gather = shape.gather and not all_private
        plan.read_bytes, plan.written_bytes = self._moved(shape, plan.oneshot, all_shared and shape.gather)
        if len(self.plans) >= _CACHE_ENTRIES:
            self.plans.clear()
        self.plans[(shape, inputs, small)] = plan
        return plan

    def _reduce(self, out, parts, divisor: int, wide: bool, publish) -> None:
        """out = sum(parts) / divisor, summed in the order of ``parts`` (``out`` may be parts[0]),
        block by block so each block is summed, divided and copied to every ``publish``
        destination while it is in cache; fp32 sums for float16 and bfloat16."""
        m = len(out)
        if m == 0:
            return
        if m <= REDUCE_BLOCK and not wide:  # one block: skip the slicing (small calls are overhead-bound)
            _sum_into(out, parts, divisor)
            for destination in publish:
                _copy(destination, out)
            return
        block = min(m, REDUCE_BLOCK)
        accumulator = self.accumulator_for(block, isinstance(out, np.ndarray)) if wide else None
        for start in range(0, m, block):
            stop = min(start + block, m)
            mine = out[start:stop]
            blocks = [part[start:stop] for part in parts]
            if wide:
                acc = accumulator[: stop - start]
                _sum_into(acc, blocks, divisor)
                _copy(mine, acc)
            else:
                _sum_into(mine, blocks, divisor)
            for destination in publish:
                _copy(destination[start:stop], mine)


def _describe(signature: int) -> str:
    kind = _KIND_NAMES.get(signature & 15, "?")
    dtype = _DTYPE_NAMES.get((signature >> 4) & 15, "?")
    return f"{kind} of {signature >> 8} x {dtype}"


def _oversubscribed() -> bool:
    """More of this job's ranks on this machine than cores we may run on (launcher's env vars)."""
    for variable in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(variable, "")
        if value.isdigit():
            return int(value) > len(os.sched_getaffinity(0))
    return False


def _copy(dst, src) -> None:
    if isinstance(dst, np.ndarray):
        np.copyto(dst, src)  # casting "same_kind": float32 accumulator -> float16 is allowed
    else:
        dst.copy_(src)


def _sum_into(out, parts, divisor: int) -> None:
    """out = (parts[0] + parts[1] + ...) / divisor in out's precision (numpy or torch views)."""
    if isinstance(out, np.ndarray):
        if len(parts) == 1:
            np.copyto(out, parts[0], casting="same_kind")
        else:
            np.add(parts[0], parts[1], out=out, dtype=out.dtype)
        for part in parts[2:]:
            np.add(out, part, out=out, dtype=out.dtype)
        if divisor > 1:
            np.divide(out, divisor, out=out)
    else:
        out.copy_(parts[0])
        for part in parts[1:]:
            out.add_(part)
        if divisor > 1:
            out.div_(divisor)


def _native_module(node: MPI.Comm):
    """The compiled module with ``shm_allreduce`` if every rank of ``node`` has it, else None.

    Collective over ``node`` (every rank must take the same path). The first use on a machine
    builds the C++ extension (``mpilm.kernels``, ~40 s, cached); ``MPILM_KERNELS=torch`` or a
    failed build means the Python path, which is slower per call (see the module docstring).
    """
    module = kernels.load()
    usable = module is not None and getattr(module, "shm_context_words", lambda: -1)() == _CTX_WORDS
    everyone = node.allreduce(usable, op=MPI.LAND)  # cold path (once per node group): blocks on every rank
    return module if everyone else None


# ---------------------------------------------------------------- groups, cached per node comm
_groups: dict[int, _NodeGroup] = {}


def _group(node: MPI.Comm) -> _NodeGroup:
    """The node group of ``node`` (collective on first use: creates the control block)."""
    key = node.py2f()
    group = _groups.get(key)
    if group is None:
        group = _groups[key] = _NodeGroup(node)
    return group


@atexit.register
def _free_windows_at_exit() -> None:
    # runs before mpi4py finalizes MPI; every rank frees the same windows in creation order
    if not MPI.Is_initialized() or MPI.Is_finalized():
        return
    for group in _groups.values():
        group.free_all()
    _groups.clear()
    _single_node.clear()


def live_windows() -> int:
    """Number of shared windows this process holds (control blocks, scratch, shared buffers)."""
    return sum(len(group.windows()) for group in _groups.values())


_single_node: dict[tuple, tuple] = {}


def _node_of(comm: MPI.Comm | None) -> tuple[MPI.Comm, _NodeGroup | None]:
    """``comm``'s node communicator and its group (None for one rank); ValueError if multi-node.

    Cached per (communicator, ``MPILM_RANKS_PER_NODE``), the hot path of every call.
    """
    comm = comm or world.WORLD
    key = (comm.py2f(), os.environ.get("MPILM_RANKS_PER_NODE"))
    known = _single_node.get(key)
    if known is None:
        node = world.node_comm(comm)
        if node.Get_size() != comm.Get_size():
            raise ValueError(
                f"shm: the communicator spans several nodes ({comm.Get_size()} ranks, "
                f"{node.Get_size()} on this node); use algorithm 'hier' for multi-node allreduce"
            )
        known = _single_node[key] = (node, _group(node) if node.Get_size() > 1 else None)
    return known


def check(buf: torch.Tensor, op: str, what: str = "shm") -> None:
    """ValueError unless ``buf`` is a host, 1-D, contiguous tensor of a supported dtype and ``op``
    is sum or avg (``hier`` checks its arguments with it too)."""
    common.check(buf, what, op, dtypes=SUPPORTED_DTYPES)
    if buf.is_cuda:
        raise ValueError(f"{what}: CUDA tensors have no shared-memory path (no CUDA IPC); "
                         f"collectives.allreduce(..., {what!r}) runs the device ring for them")


# ---------------------------------------------------------------- public API
def allreduce(buf: torch.Tensor, comm: MPI.Comm | None = None, op: str = "avg") -> torch.Tensor:
    """Allreduce ``buf`` in place over ``comm`` (all on one node) through shared memory."""
    check(buf, op)
    node, group = _node_of(comm)
    if group is None or buf.numel() == 0:
        return common.finish(buf, node.Get_size(), op)
    return group.run(buf, "allreduce", group.even, group.p if op == "avg" else 1)


def allreduce_split(buf: torch.Tensor, node: MPI.Comm, split, between) -> torch.Tensor:
    """Sum ``buf`` over the ranks of ``node`` region by region, with ``between`` run on this
    rank's summed region before the peers gather it; in place, returns ``buf``. Collective over
    ``node`` (one node's communicator, e.g. ``world.node_comm(comm)``).

    ``split.bounds(n)`` gives every node rank's ``(lo, hi)`` region of n elements (regions
    partition ``[0, n)`` and are the same on every rank; ``split`` is hashable: call shapes are
    cached by it). Node rank i sums region i from its peers' memory, calls ``between(region)``
    (a CPU tensor view of ``buf``, which it may change in place: ``hier`` runs its inter-node
    allreduce there) and then every rank copies every finished region. No divide: ``between``
    applies any. Host tensors only; a node of one rank calls ``between(buf)`` directly.
    """
    check(buf, "sum", "allreduce_split")
    if node.Get_size() == 1 or buf.numel() == 0:
        if buf.numel():
            between(buf)
        return buf
    return _group(node).run(buf, "allreduce", split, 1, between=between)


def reduce_scatter(buf: torch.Tensor, comm: MPI.Comm | None = None, op: str = "avg") -> torch.Tensor:
    """Reduce ``buf`` over ``comm`` (one node); returns this rank's reduced slice, a view of buf.

    The slice is ``buf[shard_bounds(n, p, rank)]``; the rest of ``buf`` keeps its input values.
    """
    check(buf, op, "shm.reduce_scatter")
    node, group = _node_of(comm)
    p, me = node.Get_size(), node.Get_rank()
    lo, hi = shard_bounds(buf.numel(), p, me)
    if group is not None and buf.numel() > 0:
        group.run(buf, "reduce_scatter", group.even, p if op == "avg" else 1)
    return buf[lo:hi]


def allgather(buf: torch.Tensor, comm: MPI.Comm | None = None) -> torch.Tensor:
    """Fill every rank's slice ``shard_bounds(n, p, r)`` of ``buf`` from rank r (one node)."""
    check(buf, "sum", "shm.allgather")
    node, group = _node_of(comm)
    if group is not None and buf.numel() > 0:
        group.run(buf, "allgather", group.even, 1)
    return buf


def reduce_scatter_split(buf: torch.Tensor, node: MPI.Comm, split) -> torch.Tensor:
    """Sum ``buf`` over the ranks of ``node`` so that node rank i's region ``split.bounds(n)[i]``
    holds the node's sum (no divide); the rest keeps its input. In place, returns ``buf``.
    Collective over ``node``; ``split`` as for ``allreduce_split``. ``hier``'s first half."""
    check(buf, "sum", "reduce_scatter_split")
    if node.Get_size() > 1 and buf.numel() > 0:
        _group(node).run(buf, "reduce_scatter", split, 1)
    return buf


def allgather_split(buf: torch.Tensor, node: MPI.Comm, split) -> torch.Tensor:
    """Fill node rank i's region ``split.bounds(n)[i]`` of ``buf`` on every rank of ``node``
    from rank i, in place; returns ``buf``. Collective over ``node``. ``hier``'s second half."""
    check(buf, "sum", "allgather_split")
    if node.Get_size() > 1 and buf.numel() > 0:
        _group(node).run(buf, "allgather", split, 1)
    return buf


def implementation(comm: MPI.Comm | None = None) -> str:
    """Which code runs the allreduces on ``comm``'s node, in one line for banners. Collective on
    first use per node (it sets up the node group, building the C++ kernels if need be)."""
    group = _group(world.node_comm(comm or world.WORLD))
    if NATIVE and group.native is not None:
        return "C++ (kernels/mpilm_shm.cpp)"
    return "Python (shm.NATIVE is False)" if not NATIVE else f"Python, ~8 us slower per call: {kernels.status()}"


def alloc_shared_buffer(numel: int, dtype: torch.dtype = torch.float32, comm: MPI.Comm | None = None) -> torch.Tensor:
    """Collective over the node of ``comm``: a 1-D tensor living in this rank's shared segment.

    Make the flat gradient buffer with it and ``allreduce``/``hier`` skip the copy into shared
    memory (and sync 2): peers read the gradients where backward wrote them. Views of it (buckets)
    work too. The memory stays valid until ``free_shared_buffer`` or interpreter exit.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"alloc_shared_buffer: dtype {dtype} is not supported")
    if numel < 0:
        raise ValueError(f"alloc_shared_buffer: numel {numel} must be >= 0")
    group = _group(world.node_comm(comm or world.WORLD))
    element_size = _ELEMENT_SIZES[dtype]
    window = _SharedWindow(group.node, max(numel * element_size, 64))
    group.add_buffer(window)
    segment = torch.frombuffer(window._memory[group.me], dtype=torch.uint8)
    return segment[: numel * element_size].view(dtype)


def free_shared_buffer(tensor: torch.Tensor, comm: MPI.Comm | None = None) -> None:
    """Collective over the node: free the window behind ``tensor`` (which must not be used again)."""
    group = _group(world.node_comm(comm or world.WORLD))
    where = group.locate(tensor)
    if where is None:
        raise ValueError("free_shared_buffer: tensor does not lie in a buffer from alloc_shared_buffer")
    group.free_buffer(where[0])  # collective over the node
