"""Single-node allreduce through an MPI-3 shared-memory window (``algorithm="shm"``).

How one call works, for the p ranks of one node (``world.node_comm(comm)``; fake nodes from
``MPILM_RANKS_PER_NODE`` are honoured):

1. a rank whose buffer is ordinary private memory copies the slices its peers will read into its
   segment of a persistent shared *scratch* window (nothing to copy when the buffer already lies
   in a shared window: see ``alloc_shared_buffer``); it describes the call (kind, length, dtype,
   where its input lies) in a small shared *control block* and arrives at sync 1. A mismatch
   between ranks' calls raises ValueError on every rank instead of corrupting data or hanging;
2. rank i reduces slice i (``shard_bounds(n, p, i)``) straight from its peers' memory (plain
   loads from their segments) into its own buffer, block by block: sum (fp32 accumulation for
   float16 and bfloat16), divide by p for ``avg`` and, for a private buffer, copy the block to
   its scratch segment for the peers, all while the block is in cache; arrives at sync 2;
3. every rank copies the p-1 reduced slices of its peers into its buffer. When some rank's
   buffer is a shared buffer, which its owner may write again as soon as the call returns, a
   sync 3 holds everyone until all peers have read it.
So a call costs two syncs (``reduce_scatter`` and ``allgather`` one each): the scratch window
has two halves used by alternate calls, so a rank may start copying in call k+1 while a slow
peer still copies results out of call k (it can never be two calls behind: it would not have
passed sync 1 of call k+1).

Synchronisation uses the window's own primitives: all windows stay in one ``Lock_all`` passive
epoch, every sync is ``Win.Sync`` (a memory barrier) + an arrival counter in the shared control
block + ``Win.Sync``, and a rank waits by polling its peers' counters: busy-polling like MPI
libraries do (handing the GIL to other threads every few microseconds), then yielding the core,
then sleeping; only briefly busy when the machine runs more of our ranks than it has cores.
A sync costs about 1.5 us here against 4-9 us for ``MPI_Barrier``.

Measured (2 ranks, float32, ``python -m mpilm.bench allreduce``, time ratio against MPICH's
allreduce; ``docs/figures/allreduce-shm-np2*``): with the caller's private buffer, copied in,
0.86x at 64 KiB, 1.1-1.2x from 256 KiB to 4 MiB, at par at 16 MiB and 1.8-2.1x from 64 MiB: the
copy in and the publishing copy cost memory bandwidth that MPICH's single-copy point-to-point
path does not spend. With the buffer from ``alloc_shared_buffer`` (nothing copied in or
published) 1.05x at 64 KiB, 1.4x at 256 KiB, 1.9x at 1-4 MiB and 2.5-4x from 16 MiB. About 10 us
of every call is Python, which is what keeps the smallest sizes at par.

Windows are collective objects, cached per node communicator; the scratch window (2 x the
largest buffer seen) is reused by every call and replaced by one twice as large (the old one
freed with ``Win.Free``) only when a larger buffer arrives, so any number of calls of varying
sizes keep memory bounded. Everything left is freed at interpreter exit while MPI is still up.

Element-wise work goes through numpy views of the window memory for float32/float64/float16:
at 64 KiB the cost of a call is dominated by per-op overhead, and numpy's slicing and ufunc
dispatch are 5-10x cheaper than torch's on these CPUs (measured: 0.3 us against 3 us per slice).
bfloat16, which numpy lacks, takes the same steps with torch ops.

Limits:
- one node only: a ``comm`` spanning several nodes raises ValueError (use ``hier``);
- host memory only: CUDA tensors are handed to the device ring (``collectives.allreduce(...,
  "ring")``, which stages through pinned host buffers when MPI is not CUDA-aware); CUDA IPC
  between GPUs of a node is not implemented;
- every rank must pass the same length and dtype (checked: a mismatch raises ValueError);
- shared-memory loads are not network traffic: ``world.traffic`` is left untouched (the only MPI
  calls are the collective window creations).
"""

from __future__ import annotations

import atexit
import os
import select
import time

import numpy as np
import torch
from mpi4py import MPI

from mpilm.comm import world
from mpilm.comm.collectives import shard_bounds  # collectives imports this module lazily, no cycle

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPE_CODES = {dtype: code for code, dtype in enumerate(SUPPORTED_DTYPES, start=1)}
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}
_ELEMENT_SIZES = {torch.float32: 4, torch.float64: 8, torch.float16: 2, torch.bfloat16: 2}
_CACHE_ENTRIES = 256  # call shapes remembered (plans, splits); cleared when full

MIN_SCRATCH_BYTES = 1 << 20  # first scratch window; later ones double
REDUCE_BLOCK = 1 << 17  # elements summed, divided and published per pass, while in L2
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

    __slots__ = ("n", "dtype", "signature", "lo", "hi", "bounds", "reduce", "gather", "as_numpy", "wide")


class _Plan:
    """What a call of one shape reads and writes in shared memory, given where every input lies;
    independent of the caller's tensor, so it is cached."""

    __slots__ = ("sources", "publish", "gather_from", "sync_after_reduce", "sync_after_gather")


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
        self.arrivals = 0
        self.calls = 0  # its parity picks the scratch half and the call description a call uses
        self.scratch: _SharedWindow | None = None
        self.buffers: dict[int, _SharedWindow] = {}  # alloc_shared_buffer windows, by id
        self.next_buffer_id = 0
        self.plans: dict[tuple, _Plan] = {}
        self.shapes: dict[tuple, _Shape] = {}
        self.scratch_halves: dict[torch.dtype, tuple] = {}  # this rank's two scratch halves, per dtype
        self.accumulator: torch.Tensor | None = None  # private fp32 sums for half types
        self.accumulator_numpy: np.ndarray | None = None

    # ---------------------------------------------------------------- synchronisation
    def _fence(self) -> None:
        # Win.Sync is MPI's memory barrier for windows in the unified model (all of ours, checked
        # at creation): our stores to shared memory become visible before the counter store, and
        # our loads happen after seeing the peers' counters. One processor barrier covers every
        # window, so only the control window is synced.
        self.control.win.Sync()

    def arrive_and_wait(self) -> None:
        """Sync point: publish this rank's arrival, wait for every node peer to arrive too."""
        self._fence()
        self.arrivals += 1
        target = self.arrivals
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
                elif waited < SPIN_YIELD_S:
                    os.sched_yield()  # releases the GIL and the core
                else:
                    time.sleep(SPIN_SLEEP_S)
        self._fence()

    def publish(self, where: tuple[int, int], signature: int) -> None:
        """Describe this call (``self.calls`` parity picks the copy) for the peers to check and read."""
        base = self.description_bases[self.calls & 1][self.me]
        slots = self.slots
        slots[base + _WINDOW], slots[base + _OFFSET] = where
        slots[base + _SIGNATURE] = signature

    def read_inputs(self, signature: int) -> tuple[tuple[int, int], ...]:
        """Every rank's published (window, offset); ValueError on every rank alike if calls differ."""
        slots, bases = self.slots, self.description_bases[self.calls & 1]
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

    def copy_in(self, local, shape: _Shape) -> tuple[int, int]:
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
        parity = self.calls & 1
        target = halves[parity]
        if n > len(target):
            return _GROWING
        if shape.reduce:  # the peers read the slices they reduce: all but mine
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
        n, dtype = buf.numel(), buf.dtype
        shape = self.shapes.get((kind, split, n, dtype))
        if shape is None:
            shape = self._shape(kind, split, n, dtype)
        mine = self.locate(buf) if self.buffers else None
        self.calls += 1
        if mine is None:
            local = buf.numpy() if shape.as_numpy else buf
            mine = self.copy_in(local, shape)
        else:  # a view of my segment, already at hand (cheaper than buf.numpy())
            local = self.buffers[mine[0]].segment(self.me, dtype, shape.as_numpy)[mine[1] : mine[1] + n]
        self.publish(mine, shape.signature)
        self.arrive_and_wait()  # sync 1: every input lies in shared memory, its place published
        inputs = self.read_inputs(shape.signature)
        if _GROWING in inputs:
            # some scratch was too small; capacities are equal on all ranks, so all grow together
            self.grow_scratch(n * _ELEMENT_SIZES[dtype])
            if mine == _GROWING:
                mine = self.copy_in(local, shape)
            self.publish(mine, shape.signature)
            self.arrive_and_wait()  # sync 1 again, now with every input in place
            inputs = self.read_inputs(shape.signature)
        plan = self.plans.get((shape, inputs))
        if plan is None:
            plan = self._plan(shape, inputs)
        if shape.reduce:
            own = local[shape.lo : shape.hi]
            # my region, summed into buf itself (and into shared memory for the peers to read)
            self._reduce(own, plan.sources, divisor, shape.wide, None if between else plan.publish)
            if between is not None:
                between(torch.from_numpy(own) if shape.as_numpy else own)
                if plan.publish is not None:
                    _copy(plan.publish, own)
            if plan.sync_after_reduce:
                self.arrive_and_wait()  # sync 2: reduced regions ready, the inputs all read
        for q_lo, q_hi, source in plan.gather_from:
            _copy(local[q_lo:q_hi], source)
        if plan.sync_after_gather:
            self.arrive_and_wait()  # sync 3: shared buffers are free again for their owners
        return buf

    def _shape(self, kind: str, split, n: int, dtype: torch.dtype) -> _Shape:
        shape = _Shape()
        shape.n, shape.dtype = n, dtype
        shape.signature = (n << 8) | (_DTYPE_CODES[dtype] << 4) | _KINDS[kind]
        shape.lo, shape.hi = split.bounds(n)[self.me]
        shape.bounds = split.bounds(n)
        shape.reduce, shape.gather = kind != "allgather", kind != "reduce_scatter"
        shape.as_numpy = dtype in _NUMPY_DTYPES
        shape.wide = dtype in (torch.float16, torch.bfloat16)
        if len(self.shapes) >= _CACHE_ENTRIES:
            self.shapes.clear()
        self.shapes[(kind, split, n, dtype)] = shape
        return shape

    def _plan(self, shape: _Shape, inputs) -> _Plan:
        n, lo, hi, bounds = shape.n, shape.lo, shape.hi, shape.bounds
        data = []
        for q, (window_id, offset) in enumerate(inputs):
            window = self.scratch if window_id == _SCRATCH else self.buffers[window_id]
            data.append(window.segment(q, shape.dtype, shape.as_numpy)[offset : offset + n])
        plan = _Plan()
        plan.sources = [data[q][lo:hi] for q in self.peers] if shape.reduce else []
        private = inputs[self.me][0] == _SCRATCH
        plan.publish = data[self.me][lo:hi] if shape.reduce and shape.gather and private else None
        plan.gather_from = [(bounds[q][0], bounds[q][1], data[q][bounds[q][0] : bounds[q][1]])
                            for q in self.peers if shape.gather and bounds[q][1] > bounds[q][0]]
        any_shared = any(window_id != _SCRATCH for window_id, _ in inputs)
        plan.sync_after_reduce = shape.reduce and (shape.gather or any_shared)
        plan.sync_after_gather = shape.gather and any_shared
        if len(self.plans) >= _CACHE_ENTRIES:
            self.plans.clear()
        self.plans[(shape, inputs)] = plan
        return plan

    def _reduce(self, own, sources, divisor: int, wide: bool, publish) -> None:
        """own = (own + sum(sources)) / divisor, block by block so each block is summed, divided
        (and copied to ``publish``) while it is in cache; fp32 sums for float16 and bfloat16."""
        m = len(own)
        if m == 0:
            return
        if m <= REDUCE_BLOCK and not wide:  # one block: skip the slicing (small calls are overhead-bound)
            _sum_into(own, [own, *sources], divisor)
            if publish is not None:
                _copy(publish, own)
            return
        block = min(m, REDUCE_BLOCK)
        accumulator = self.accumulator_for(block, isinstance(own, np.ndarray)) if wide else None
        for start in range(0, m, block):
            stop = min(start + block, m)
            mine = own[start:stop]
            parts = [mine] + [source[start:stop] for source in sources]
            if wide:
                acc = accumulator[: stop - start]
                _sum_into(acc, parts, divisor)
                _copy(mine, acc)
            else:
                _sum_into(mine, parts, divisor)
            if publish is not None:
                _copy(publish[start:stop], mine)


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


def _check(buf: torch.Tensor, op: str, algorithm: str = "shm") -> None:
    if op not in ("sum", "avg"):
        raise ValueError(f"{algorithm}: op {op!r}: expected 'sum' or 'avg'")
    if buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(f"{algorithm}: expected a 1-D contiguous tensor, got shape {tuple(buf.shape)}")
    if buf.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise ValueError(f"{algorithm}: dtype {buf.dtype} is not supported (use one of {names})")


def _on_device(buf: torch.Tensor, comm: MPI.Comm | None, op: str) -> torch.Tensor:
    # GPUs of one node have no shared host window to meet in (no CUDA IPC here): use the device
    # ring, which stages through pinned host memory when MPI is not CUDA-aware
    from mpilm.comm import collectives

    return collectives.allreduce(buf, comm, algorithm="ring", op=op)


# ---------------------------------------------------------------- public API
def allreduce(buf: torch.Tensor, comm: MPI.Comm | None = None, op: str = "avg") -> torch.Tensor:
    """Allreduce ``buf`` in place over ``comm`` (all on one node) through shared memory."""
    _check(buf, op)
    if buf.is_cuda:
        return _on_device(buf, comm, op)
    node, group = _node_of(comm)
    if group is None or buf.numel() == 0:
        return buf.div_(group.p) if op == "avg" and group is not None else buf
    return group.run(buf, "allreduce", group.even, group.p if op == "avg" else 1)


def reduce_scatter(buf: torch.Tensor, comm: MPI.Comm | None = None, op: str = "avg") -> torch.Tensor:
    """Reduce ``buf`` over ``comm`` (one node); returns this rank's reduced slice, a view of buf.

    The slice is ``buf[shard_bounds(n, p, rank)]``; the rest of ``buf`` keeps its input values.
    """
    _check(buf, op)
    if buf.is_cuda:
        raise ValueError("shm.reduce_scatter: CUDA tensors are not supported (use collectives.reduce_scatter)")
    node, group = _node_of(comm)
    p, me = node.Get_size(), node.Get_rank()
    lo, hi = shard_bounds(buf.numel(), p, me)
    if group is not None and buf.numel() > 0:
        group.run(buf, "reduce_scatter", group.even, p if op == "avg" else 1)
    return buf[lo:hi]


def allgather(buf: torch.Tensor, comm: MPI.Comm | None = None) -> torch.Tensor:
    """Fill every rank's slice ``shard_bounds(n, p, r)`` of ``buf`` from rank r (one node)."""
    _check(buf, "sum")
    if buf.is_cuda:
        raise ValueError("shm.allgather: CUDA tensors are not supported (use collectives.allgather)")
    node, group = _node_of(comm)
    if group is not None and buf.numel() > 0:
        group.run(buf, "allgather", group.even, 1)
    return buf


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
