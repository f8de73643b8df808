"""The gradient sync engine: flat buffers, buckets, backward hooks, the communication thread.

What it does:
- **Flat buffers.** All trainable parameters of one dtype live in one flat parameter buffer and
  their gradients in one flat gradient buffer: ``param.data`` and ``param.grad`` are views into
  them, so backward writes gradients straight into the memory the collectives reduce (no copy
  into or out of buckets) and ZeRO-1 / local SGD / the parameter server can address all
  parameters as one vector. Parameters are laid out in *reverse* registration order, the order
  their gradients become ready in backward, so each bucket is one contiguous slice of both.
- **Buckets.** The bucket map depends only on the parameter shapes and ``bucket_bytes`` and is
  checked to be identical on every rank at start (a mismatch means ranks built different models,
  which would otherwise corrupt gradients silently or hang).
- **Hooks.** A post-accumulate-grad hook on every parameter counts down its bucket; the bucket
  is *ready* when its last parameter's gradient has landed. ``arm(final)`` before each backward
  says whether this backward is the last micro-step of the step: on earlier micro-steps of
  gradient accumulation the hooks do nothing (DDP's ``no_sync``).
- **One communication thread** (``overlap=True``): ready buckets are handed to it strictly in
  bucket order, and it reduces them (compress + collective, through the ``Reducer``) while
  backward computes earlier layers. ``wait()`` (before the optimizer) blocks until every bucket
  is reduced. Without overlap, ``wait()`` reduces the buckets itself, in the same order with the
  same code, so overlap on and off give bit-identical results.
- **Unused parameters.** A parameter that gets no gradient in a step (its hook never fires)
  does not deadlock: ``wait()`` releases every bucket that is not yet ready, in bucket order, and
  its missing gradients reduce as the zeros ``begin_step`` left (DDP's
  ``find_unused_parameters``, decided per step at the end of backward instead of by a graph
  walk). The buckets after it in order then wait for the end of backward too; the first time it
  happens, the rank says which parameters had no gradient.
- **ZeRO-1 half.** With ``shard=True`` each bucket is reduce-scattered instead of allreduced:
  rank r's ``shard_bounds`` slice of every bucket holds the average; the rest holds partials.
- **Polite waiting.** With ``poll_s`` the communication thread waits on its peers by testing and
  sleeping (``common.poll_politely``) instead of MPI's busy Wait, which would take a core from the
  backward it hides behind.
- **Priority.** With ``priority_levels`` the communication thread runs that many nice levels
  ahead of the compute thread (``world.prioritize_this_thread``), so a wake-up to move the next
  segment is served at once instead of after backward's time slice.
- **CUDA.** The communication thread works on its own stream; each bucket's reduction waits on
  an event recorded on the producer stream when the bucket became ready, and ``wait()`` makes the
  caller's stream wait on an event recorded after the reduction: no device-wide synchronize.

What it does not: choose algorithms or compress (``collectives`` / ``compress`` via the reducer),
clip or step the optimizer (``optim``), time phases (the reducer returns each bucket's timing;
``wait()`` returns them with the time the caller blocked per bucket).

Limits: zero gradients through ``zero_()`` only (``zero_grad(set_to_none=True)`` would detach
the views, which ``check_views`` reports). Buckets are reduced in fixed order, so a bucket whose
gradients arrive early still waits for the buckets before it (no re-bucketing by observed order,
as DDP does after its first step). The communication thread must be the only user of the
communicator handed in while a step is in flight (``wait()`` returns it to the caller).
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from mpi4py import MPI

from mpilm.comm import common, shm, world
from mpilm.comm.collectives import shard_bounds
from mpilm.comm.compress import BucketTiming


@dataclass
class Bucket:
    index: int
    dtype: torch.dtype
    start: int  # element offsets into the flat buffers of this dtype
    stop: int
    names: list[str] = field(default_factory=list)
    view: torch.Tensor | None = None  # the gradients
    params: torch.Tensor | None = None  # the parameters, same range of the flat parameter buffer

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def nbytes(self) -> int:
        return self.numel * self.view.element_size()


class GradBuffer:
    def __init__(self, named_params, bucket_bytes: float, comm: MPI.Comm, device: torch.device | str = "cpu",
                 shared_memory: bool = False, reducer=None, overlap: bool = False, shard: bool = False,
                 poll_s: float | None = None, priority_levels: int = 0, watchdog=None):
        self.comm = comm
        self.reducer = reducer
        self.overlap = False  # until start_overlap() below
        self.shard = shard
        self.poll_s = poll_s  # the comm thread's waits: test-and-sleep period (None: MPI's busy Wait)
        self.priority_levels = priority_levels
        self.watchdog = watchdog  # world.TimedWatchdog: aborts the job if a bucket's wait outlasts --comm-timeout
        self.priority = "no communication thread"  # what prioritize_this_thread did, for the banner
        self.device = torch.device(device)
        params = [(n, p) for n, p in named_params if p.requires_grad]
        if not params:
            raise ValueError("GradBuffer: the model has no trainable parameters")
        self.params = [p for _, p in params]
        self.flat: dict[torch.dtype, torch.Tensor] = {}
        self.flat_params: dict[torch.dtype, torch.Tensor] = {}
        self.buckets: list[Bucket] = []
        self.layout: list[tuple[str, torch.nn.Parameter, int, int]] = []  # (name, param, start, stop) per dtype flat
        self._expected_ptr: list[tuple[torch.nn.Parameter, int]] = []
        self._bucket_of: dict[int, int] = {}

        for dtype in dict.fromkeys(p.dtype for _, p in params):
            group = [(n, p) for n, p in reversed(params) if p.dtype == dtype]  # gradient-ready order
            total = sum(p.numel() for _, p in group)
            if shared_memory and self.device.type == "cpu" and dtype in shm.SUPPORTED_DTYPES:
                # collective over the node: peers' shm reductions read these gradients in place
                flat = shm.alloc_shared_buffer(total, dtype, comm)
                flat.zero_()
            else:
                flat = torch.zeros(total, dtype=dtype, device=self.device)
            flat_params = torch.empty(total, dtype=dtype, device=self.device)
            self.flat[dtype], self.flat_params[dtype] = flat, flat_params
            offset, bucket = 0, None
            with torch.no_grad():
                for name, p in group:
                    flat_params[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
                    p.data = flat_params[offset:offset + p.numel()].view_as(p)
                    p.grad = flat[offset:offset + p.numel()].view_as(p)
                    self._expected_ptr.append((p, p.grad.data_ptr()))
                    self.layout.append((name, p, offset, offset + p.numel()))
                    if bucket is None:
                        bucket = Bucket(len(self.buckets), dtype, offset, offset)
                    offset += p.numel()
                    bucket.stop = offset
                    bucket.names.append(name)
                    self._bucket_of[id(p)] = bucket.index
                    if bucket.numel >= bucket_bytes / flat.element_size():
                        self._close(bucket)
                        bucket = None
            if bucket is not None:
                self._close(bucket)
        self._check_identical_map()
        self._params_in = [sum(1 for p in self.params if self._bucket_of[id(p)] == b.index) for b in self.buckets]
        self._pending = list(self._params_in)
        self._landed: set[int] = set()
        self._armed = False
        self._next = 0  # the next bucket to hand out, in bucket order
        self._ready = [False] * len(self.buckets)
        self._step = 0
        self._ready_events: list = [None] * len(self.buckets)
        self._unused_reported = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]
        self._thread = None
        if overlap:
            self.start_overlap()

    def start_overlap(self) -> None:
        """Start the communication thread: from now on ready buckets are reduced during backward.

        Call between steps (the caller may first look at the bucket sizes to decide).
        """
        if self.overlap or self.reducer is None:
            return
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._work: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        started = threading.Event()
        self._thread = threading.Thread(target=self._comm_loop, args=(started,), name="mpilm-comm", daemon=True)
        self._thread.start()
        started.wait()  # its priority is set before any step: the banner can say what it got
        self.overlap = True

    def _close(self, bucket: Bucket) -> None:
        bucket.view = self.flat[bucket.dtype][bucket.start:bucket.stop]
        bucket.params = self.flat_params[bucket.dtype][bucket.start:bucket.stop]
        self.buckets.append(bucket)

    def signature(self) -> str:
        text = ";".join(f"{b.dtype}:{b.start}:{b.stop}:{','.join(b.names)}" for b in self.buckets)
        return hashlib.sha256(text.encode()).hexdigest()

    def _check_identical_map(self) -> None:
        # start-up only, so the pickle-based allgather is fine; blocks until every rank built its map
        signatures = self.comm.allgather(self.signature())
        if len(set(signatures)) != 1:
            bad = [r for r, s in enumerate(signatures) if s != signatures[0]]
            raise RuntimeError(f"gradient bucket map differs on ranks {bad} from rank 0: the ranks built different models")

    # ---------------------------------------------------------------- one step
    def begin_step(self, step: int) -> None:
        """Zero the gradients and reset the bucket countdown; call before the step's first backward."""
        if self._next not in (0, len(self.buckets)):
            raise RuntimeError("GradBuffer.begin_step: the previous step's buckets were not waited for")
        self.zero_()
        self._step = step
        self._pending = list(self._params_in)
        self._landed.clear()
        self._ready = [False] * len(self.buckets)
        self._next = 0
        self._armed = False

    def arm(self, final: bool) -> None:
        """Say whether the next backward completes the step's gradients (the last micro-step).

        Earlier micro-steps only accumulate: no bucket is handed out, nothing is communicated.
        """
        self._armed = final

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        # runs in the autograd engine, once per parameter per backward, after .grad accumulated
        if not self._armed or id(p) in self._landed:
            return
        self._landed.add(id(p))
        index = self._bucket_of[id(p)]
        self._pending[index] -= 1
        if self._pending[index] == 0:
            self._mark_ready(index)

    def _mark_ready(self, index: int) -> None:
        self._ready[index] = True
        if self.device.type == "cuda" and self.overlap:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))  # the producer of this bucket's gradients
            self._ready_events[index] = event
        if self.overlap:
            while self._next < len(self.buckets) and self._ready[self._next]:
                self._work.put((self._next, self._step))  # the comm thread takes buckets in this order only
                self._next += 1

    def wait(self) -> list[BucketTiming]:
        """Block until every bucket is reduced; returns each bucket's timing, in bucket order.

        Buckets still not ready (a parameter without a gradient this step) are released now, in
        order. Without overlap this is where the buckets are reduced. Re-raises an error of the
        communication thread.
        """
        self.check_views()
        # a bucket still not ready after an armed backward holds a parameter that got no gradient
        unused = ([n for n, p, *_ in self.layout if id(p) not in self._landed]
                  if self._armed and not all(self._ready) else [])
        if unused and not self._unused_reported:
            self._unused_reported = True
            print(f"[rank {self.comm.Get_rank()}] note: no gradient this step (step {self._step}) for "
                  f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}: their buckets reduce zeros "
                  "after backward (not overlapped)", flush=True)
        for index in range(len(self.buckets)):
            if not self._ready[index]:
                self._mark_ready(index)
        self._armed = False
        if self.reducer is None:  # no reducer: the gradients are averaged elsewhere (e.g. DDP's own hooks)
            self._next = len(self.buckets)
            return []
        timings = []
        if not self.overlap:
            for bucket in self.buckets:
                # SYNC: each bucket blocks until every rank has contributed it
                with self._watched(bucket):
                    t = self._reduce(bucket, self._step)
                t.exposed_s = t.total_s
                timings.append(t)
            self._next = len(self.buckets)
            return timings
        for bucket in self.buckets:
            t0 = time.perf_counter()
            with self._watched(bucket):
                result = self._results.get()  # SYNC: blocks on the comm thread, which blocks on the peers
            if isinstance(result, BaseException):
                raise result
            result.exposed_s = time.perf_counter() - t0
            timings.append(result)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_event(self._done_event)  # later kernels see the averages
        return timings

    def _watched(self, bucket: Bucket):
        """The watchdog's view of a wait for ``bucket`` (a no-op without one)."""
        if self.watchdog is None:
            return contextlib.nullcontext()
        verb = "reduce-scatter" if self.shard else "allreduce"
        algorithm = getattr(self.reducer, "algorithm", "?")
        return self.watchdog.waiting(
            f"the {verb} of gradient bucket {bucket.index} ({bucket.nbytes / 2**20:.2f} MiB, {algorithm}) in step "
            f"{self._step}, with all {self.comm.Get_size()} ranks")

    def _reduce(self, bucket: Bucket, step: int) -> BucketTiming:
        if self.shard:
            return self.reducer.reduce_scatter(bucket, step)
        return self.reducer.reduce(bucket, step)

    def _comm_loop(self, started: threading.Event) -> None:
        """The communication thread: reduce buckets in the order they are handed out, forever."""
        common.poll_politely(self.poll_s)  # leave the cores to backward while waiting on peers
        try:
            self.priority = world.prioritize_this_thread(self.priority_levels)  # run when woken, not after a slice
        except OSError as err:  # e.g. a sandbox without setpriority: run at equal priority, and say so
            self.priority = f"communication thread at the same priority as compute ({err.strerror})"
        started.set()
        while True:
            item = self._work.get()
            if item is None:
                return
            index, step = item
            try:
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        self._stream.wait_event(self._ready_events[index])  # after the gradients' producer
                        result = self._reduce(self.buckets[index], step)
                        self._done_event = torch.cuda.Event()
                        self._done_event.record(self._stream)
                else:
                    result = self._reduce(self.buckets[index], step)
            except BaseException as err:  # handed to wait(), which raises it on the main thread
                result = err
            self._results.put(result)

    def close(self) -> None:
        """Stop the communication thread and remove the hooks (idempotent)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._thread is not None:
            self._work.put(None)
            self._thread.join()
            self._thread = None

    # ---------------------------------------------------------------- helpers
    def zero_(self) -> None:
        for flat in self.flat.values():
            flat.zero_()

    def check_views(self) -> None:
        """Autograd must have accumulated into our views; anything else would silently skip sync."""
        for p, ptr in self._expected_ptr:
            if p.grad is None or p.grad.data_ptr() != ptr:
                raise RuntimeError(
                    "a parameter's .grad no longer points into the flat gradient buffer "
                    "(was zero_grad(set_to_none=True) called, or .grad replaced?)")

    def shard_ranges(self, bucket: Bucket) -> tuple[int, int]:
        """This rank's ZeRO-1 slice of ``bucket``, as element offsets into the dtype's flat buffers."""
        lo, hi = shard_bounds(bucket.numel, self.comm.Get_size(), self.comm.Get_rank())
        return bucket.start + lo, bucket.start + hi

    @property
    def numel(self) -> int:
        return sum(f.numel() for f in self.flat.values())


def broadcast_(tensors, comm: MPI.Comm, root: int = 0) -> None:
    """Make ``tensors`` on every rank equal to ``root``'s, through one flat buffer per dtype.

    Used once at start so every rank begins from identical parameters. Blocks until root sends.
    """
    tensors = list(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in group]).contiguous()
        if comm.Get_size() > 1:
            world.bcast_(flat, comm, root)
        offset = 0
        with torch.no_grad():
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
