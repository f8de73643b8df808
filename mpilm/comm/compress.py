"""Gradient reducers: each one averages a gradient bucket over the ranks, in place, its own way.

Public API (``grad_sync.GradBuffer`` calls it once per bucket and step, on its communication
thread when overlap is on):
    make_compressor(name, *, topk_ratio=0.01, error_feedback=True, aggregate="allgather",
                    momentum_correction=False, momentum=0.9, local_clip=0.0, warmup_steps=0,
                    dense_steps=0, precondition=None, first_moment=0.0, sign_chunk=2048,
                    sqrt_ranks_gain=False)
    reducer = compressor.bind(comm, algorithm)                 the reducer protocol below, on ``comm``
    reducer.reduce(bucket, step) -> BucketTiming              average ``bucket.view`` over the ranks
    reducer.reduce_scatter(bucket, step) -> BucketTiming      ZeRO-1: only this rank's shard averaged
    compressor.allreduce_(tensor, key, comm, algorithm, step)  the same on a bare tensor (tests, bench)
    compressor.state_dict() / load_state_dict(state)           residuals, velocities, second moments (topk, sign)
    compressor.name, compressor.describe()                      one line for the start banner
    COMPRESSORS, TOPK_AGGREGATES                                 the names ``make_compressor`` takes

Every reducer times itself: ``BucketTiming`` carries the reduction's start and end (host clock)
and the seconds of its own arithmetic (casts, selection, accumulation), so communication and
compression are told apart without the reducer knowing who times the step.

The compressors:
- ``none``: ``collectives.allreduce(bucket, comm, algorithm, "avg")``.
- ``fp16`` / ``bf16``: the bucket, divided by p in fp32, is rounded into a cached half-precision
  buffer (one per key, so no allocation per step), summed by the collectives (each add computed
  in fp32, see ``ring.py``) and copied back. Dividing first keeps the partial sums of p ranks in
  fp16's range (largest 65504); magnitudes below ~6e-8 / p flush to zero in fp16. bf16 keeps
  fp32's range with 8 bits of mantissa. Half the bytes on the wire.
- ``topk``: per bucket, the k = ceil(density x n) entries of largest magnitude of gradient plus
  residual travel as (int32 index, fp32 value) pairs. With error feedback (default) what was not
  sent stays in this rank's residual for that bucket and is added next step: the pairs sent plus
  the new residual equal the gradient plus the old residual exactly. Selection, the fused residual
  update and the sparse accumulation run in ``mpilm.kernels`` (C++/CUDA, or the torch twin that
  returns the same bits). Two ways to combine the ranks' pairs:
    * ``allgather``: every rank's k pairs go to every rank (one ``Allgather`` of a packed
      [k indices | k values] buffer; k is the same on every rank, so no counts are exchanged);
      each rank adds them into the zeroed bucket in rank order (duplicates summed, identical bits
      on every rank), then divides by p. Each rank sends and receives 8k(p-1) bytes.
    * ``gtopk`` (Shi et al. 2019, global top-k): recursive doubling; in each round partners swap
      their k pairs, merge them (duplicate indices summed, lower rank's set first so both partners
      compute the same bits) and keep the top k of the merge, so after lg p rounds every rank
      holds the same k pairs, having moved 2k lg p pairs. Who keeps what is dropped: each rank
      remembers which of *its own* k pairs are still part of its group's set; an entry dropped in
      any round is dead for every contributor in that group, and at the end each rank adds its own
      dead pairs back into its residual. The final value at an index is exactly the sum of the
      live contributions, so sent + residuals == gradients + old residuals over all ranks.
      Non-power-of-two p: the standard fold-in of ``p2p.group`` (as MPICH and mpilm's rhd/tree
      do): with rem = p - p2 (p2 the largest power of two <= p), each even rank below 2 rem
      sends its pairs to the odd rank above it, which merges them first (lower rank first),
      runs the rounds for both and at the end returns the final pairs plus one byte per pair
      saying which of the folded rank's pairs survived.
  When sparse would move at least as many bytes as a dense ring allreduce (8k(p-1) vs
  2(p-1)/p x 4n for allgather, 8k per round for gtopk), the bucket goes dense instead, with the
  residual (and DGC velocity) added in and cleared, so nothing is held back; rank 0 says so once.
  The decision uses only n, k, p and the options, so it is identical on every rank.
- DGC options of ``topk`` (Lin et al. 2018):
    * ``momentum_correction``: accumulate velocity u = m u + g and v += u (v is the residual),
      send top-k of v, zero the sent entries of u and v. The trainer must then run plain SGD
      without momentum (the compressor has applied it); config.py enforces --optimizer sgd.
    * ``local_clip``: before accumulation, scale this rank's bucket gradient to an L2 norm of at
      most local_clip / sqrt(p) (DGC's local clipping: if the p ranks' gradients were independent,
      their sum would then have norm at most local_clip). Per bucket, the unit the compressor sees.
    * ``warmup_steps``: the density decays exponentially from 25% at step 0 to the target at step
      ``warmup_steps`` (density(step) = 0.25 (target/0.25)^(step/warmup_steps)), target after.
- Options of ``topk`` for AdamW (``--topk-adam``, chosen in ``optim.topk_adam_compressor``): Adam
  divides every coordinate by the root of its second moment, so a coordinate that error feedback
  sends once in ~1/density steps, as one burst of everything it held back, has its burst squared
  into that moment and its magnitude normalised away: Adam moves it a few learning rates per
  burst, where dense Adam would have moved it a learning rate per step.
    * ``dense_steps``: every bucket goes dense (residuals flushed) before step ``dense_steps``:
      the dense warm-up of 1-bit Adam, whose optimizer then freezes its second moment
      (``optim.FrozenVarianceAdamW``), which makes Adam linear in the gradient again.
    * ``precondition=(beta2, eps)``: Adam's normalisation moves in front of the compressor.
      Each rank keeps the second moment of its *own* dense gradient, v = beta2 v + (1 - beta2)
      g^2, and sends top-k of g / (sqrt(v / (1 - beta2^(step+1))) + eps) (plus residual): the
      selection, the residual and the sum are in units of the update, and the optimizer
      (``optim.PreconditionedAdamW``) keeps only Adam's first moment and decoupled decay. The
      ranks' v differ (each sees its own batches); the sum they send does not, so every rank
      still takes the same step. No extra bytes.
    * ``first_moment=beta1`` (with ``precondition``): the first moment moves in front as well:
      each rank keeps u = beta1 u + (1 - beta1) g~ whole (unlike DGC, nothing is masked where
      sent) and error feedback sends top-k of the accumulated u, so the pairs sent plus the
      residual are exactly the sum of this rank's Adam updates; the optimizer applies the
      averaged sum without momentum. Dense buckets send u plus the residual and keep u.
- ``sign`` (scaled sign with error feedback: EF-signSGD, arXiv 1901.09847; the 1-bit
  compression of 1-bit Adam, arXiv 2102.02888): per bucket, e = gradient + residual travels as
  one bit per element (e >= 0; zero counts as positive), packed 8 to a byte (element 8i + j is
  bit j of byte i), and one fp32 scale per chunk of ``sign_chunk`` elements (0: one per bucket;
  the last chunk may be shorter): the mean |e| over the chunk, the scale that minimises the L2
  error of scale x sign(e). The decoded value is +-scale; the residual keeps e minus it exactly
  as the ranks will decode it, so what was sent plus the residual equals the gradient plus the
  old residual (to fp32 rounding of one subtraction). Every rank's message [scales | bits] goes
  to every rank (one ``Allgather``; every rank's message has the same length), each rank adds
  the decoded vectors in rank order and divides by p: identical bits everywhere. Each rank sends
  (p - 1)(ceil(n/8) + 4 ceil(n/chunk)) bytes, ~32x fewer than a dense ring at p = 2; the
  allgather grows with p, so from p ~ 60 the bucket goes dense (the rule of ``topk``). Under
  AdamW (``optim.compressor_options``) the same ``precondition`` and ``first_moment`` as top-k's:
  e is the sum of this rank's Adam updates u = b1 u + (1 - b1) g / (sqrt(v) + eps) not yet sent,
  a vector of near-uniform magnitude, where one bit and a scale lose little; with
  ``sqrt_ranks_gain`` the normalised gradient is multiplied by sqrt(p) first (this rank's v holds
  p times the noise of the averaged batch's, so its updates come out up to sqrt(p) smaller than
  dense AdamW's; the noise-dominated limit, measured at p = 2). ``local_clip`` as
  for ``topk``; no warm-up (two dense first steps, all the byte budget allows, did not help). Pure
  torch (CPU or CUDA).
- Bytes: every MPI call made here adds what it moves to ``world.traffic`` (the dense paths are
  counted by the collectives), so the compression ratio is measured, not computed.

What it does not: no bucketing or scheduling (``grad_sync.py``); option checks beyond the
arguments it is handed (``config.check`` is the one validator of the command line).

Limits: ``topk`` and ``sign`` need float32 buckets (``topk``: of fewer than 2^31 elements); every rank must call with the
same bucket sizes, keys, steps and options (the pair counts are derived, not exchanged). With
``precondition`` the second moment is updated before the trainer sees the step's norm, so a
non-finite gradient stays in that rank's v (the trainer then skips steps until --max-bad-steps).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from mpi4py import MPI

from mpilm import kernels, trace
from mpilm.comm import collectives, p2p, world

COMPRESSORS = ("none", "fp16", "bf16", "topk", "sign")
TOPK_AGGREGATES = ("allgather", "gtopk")
WARMUP_START_DENSITY = 0.25
PAIR_BYTES = 8  # int32 index + fp32 value
SIGN_CHUNK_DEFAULT = 2048  # sign: elements per fp32 scale
_TAG_GTOPK = 7301


# ---------------------------------------------------------------- schedule and byte model
def density_at(step: int, target: float, warmup_steps: int) -> float:
    """Density of step ``step``: exponential decay from 25% to ``target`` over ``warmup_steps``."""
    if warmup_steps <= 0 or step >= warmup_steps or target >= WARMUP_START_DENSITY:
        return target
    return WARMUP_START_DENSITY * (target / WARMUP_START_DENSITY) ** (max(step, 0) / warmup_steps)


def topk_count(n: int, density: float) -> int:
    """k = ceil(density x n), at least 1 for a non-empty bucket (round-off like 0.07*100 forgiven)."""
    if n == 0:
        return 0
    return min(n, max(1, math.ceil(density * n * (1.0 - 1e-12))))


def gtopk_rounds(p: int) -> int:
    """Messages each rank sends in gtopk: lg p2 rounds, plus one for ranks in a fold-in."""
    p2 = 1 << (p.bit_length() - 1)
    return (p2.bit_length() - 1) + (1 if p > p2 else 0)


def sparse_bytes(k: int, p: int, aggregate: str) -> int:
    """Bytes one rank sends to exchange k pairs over p ranks (the most any rank sends)."""
    if p <= 1:
        return 0
    if aggregate == "gtopk":
        return PAIR_BYTES * k * gtopk_rounds(p)
    return PAIR_BYTES * k * (p - 1)


def dense_bytes(n: int, p: int) -> int:
    """Bytes one rank sends in a bandwidth-optimal (ring) allreduce of n fp32 values."""
    return 2 * (p - 1) * 4 * n // p if p > 1 else 0


def goes_dense(n: int, k: int, p: int, aggregate: str) -> bool:
    """True when a dense allreduce moves no more bytes than the sparse exchange (never for p == 1)."""
    return p > 1 and sparse_bytes(k, p, aggregate) >= dense_bytes(n, p)


def sign_chunk_of(n: int, chunk: int) -> int:
    """Elements per scale in a bucket of n: ``chunk``, or the whole bucket (chunk 0, or n smaller)."""
    return n if chunk <= 0 else min(chunk, n)


def sign_message_bytes(n: int, chunk: int) -> int:
    """One rank's sign message for n elements: an fp32 scale per chunk, then ceil(n/8) bytes of bits."""
    if n == 0:
        return 0
    return 4 * -(-n // sign_chunk_of(n, chunk)) + -(-n // 8)


def sign_bytes(n: int, chunk: int, p: int) -> int:
    """Bytes one rank sends to allgather its sign message over p ranks."""
    return (p - 1) * sign_message_bytes(n, chunk) if p > 1 else 0


def adam_normalise_(grad: torch.Tensor, v: torch.Tensor, denom: torch.Tensor, step: int, beta2: float,
                    eps: float) -> None:
    """Adam's normalisation of one rank's own gradient, in place (torch AdamW's arithmetic).

    v = beta2 v + (1 - beta2) g^2, then g / (sqrt(v) / sqrt(1 - beta2^(step+1)) + eps); ``denom``
    is scratch of g's length. ``step`` is 0-based, so the correction counts every step so far.
    """
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    torch.sqrt(v, out=denom)
    denom.div_(math.sqrt(1.0 - beta2 ** (step + 1))).add_(eps)
    grad.div_(denom)


# ---------------------------------------------------------------- compressors
@dataclass
class BucketTiming:
    """One bucket's reduction: host times from the reducer, and how long the caller waited for it."""

    bucket: int
    start: float  # perf_counter when the reduction began
    stop: float  # ... and ended
    compress_s: float = 0.0  # the reducer's own arithmetic (casts, selection), inside [start, stop)
    exposed_s: float = 0.0  # how long wait() blocked on this bucket (all of it without overlap)

    @property
    def total_s(self) -> float:
        return self.stop - self.start

    @property
    def comm_s(self) -> float:
        return self.total_s - self.compress_s


class Compressor:
    """The plain reducer (``none``): a dense allreduce of the fp32 bucket. Base of the others."""

    name = "none"
    comm: MPI.Comm | None = None
    algorithm: str = "auto"
    _compress_s = 0.0  # this reduction's own arithmetic so far (reset per bucket by ``_timed``)

    def bind(self, comm: MPI.Comm, algorithm: str) -> "Compressor":
        """Fix the communicator and algorithm ``reduce`` / ``reduce_scatter`` use; returns self."""
        self.comm, self.algorithm = comm, algorithm
        return self

    def describe(self) -> str:
        return "none: dense fp32 allreduce"

    # ------------------------------------------------------------ the reducer protocol
    def reduce(self, bucket, step: int) -> BucketTiming:
        """Average ``bucket.view`` over the bound communicator, in place. Blocks on every rank."""
        return self._timed(bucket, "allreduce", lambda: self.allreduce_(bucket.view, bucket.index, self.comm,
                                                                         self.algorithm, step))

    def reduce_scatter(self, bucket, step: int) -> BucketTiming:
        """Average only this rank's ``shard_bounds`` slice of ``bucket.view`` (ZeRO-1). Blocks."""
        return self._timed(bucket, "reduce-scatter", lambda: self.reduce_scatter_(bucket.view, bucket.index,
                                                                                  self.comm, self.algorithm, step))

    def _timed(self, bucket, verb: str, work) -> BucketTiming:
        self._compress_s = 0.0
        t0 = time.perf_counter()
        # one trace event per bucket when a --trace is recording (a shared no-op otherwise)
        with trace.traced("communication", f"{verb} b{bucket.index}", bucket=bucket.index, bytes=bucket.nbytes,
                          algorithm=self.algorithm, compress=self.name):
            work()
        return BucketTiming(bucket.index, t0, time.perf_counter(), self._compress_s)

    @contextlib.contextmanager
    def _computing(self):
        """The reducer's own arithmetic: counted apart from communication, traced as compression."""
        t0 = time.perf_counter()
        tracer = trace.active_tracer()
        # on the compression track, with the args (bucket, bytes, algorithm) of the bucket being reduced
        with trace.traced("compression", self.name, **(tracer.open_args() if tracer is not None else {})):
            yield
        self._compress_s += time.perf_counter() - t0

    # ------------------------------------------------------------ on bare tensors
    def allreduce_(self, bucket: torch.Tensor, key: int, comm: MPI.Comm | None, algorithm: str, step: int) -> None:
        collectives.allreduce(bucket, comm or world.WORLD, algorithm, "avg")

    def reduce_scatter_(self, bucket: torch.Tensor, key: int, comm: MPI.Comm | None, algorithm: str,
                        step: int) -> None:
        collectives.reduce_scatter(bucket, comm or world.WORLD, "avg", algorithm)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"compressor {self.name}: unexpected state {sorted(state)}")


class HalfPrecision(Compressor):
    """Gradients travel in fp16 or bf16, divided by p first so that partial sums stay in range."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.name = "fp16" if dtype == torch.float16 else "bf16"
        self._half: dict[int, torch.Tensor] = {}

    def _half_buffer(self, bucket: torch.Tensor, key: int) -> torch.Tensor:
        half = self._half.get(key)
        if half is None or half.numel() != bucket.numel() or half.device != bucket.device:
            half = self._half[key] = torch.empty(bucket.numel(), dtype=self.dtype, device=bucket.device)
        return half

    def describe(self) -> str:
        return f"{self.name}: gradients travel as {self.name} (2 bytes per element), pre-divided by p, summed, cast back to fp32"

    def allreduce_(self, bucket, key, comm, algorithm, step):
        comm = comm or world.WORLD
        if bucket.dtype == self.dtype:
            collectives.allreduce(bucket, comm, algorithm, "avg")
            return
        half = self._half_buffer(bucket, key)
        with self._computing():
            torch.div(bucket, comm.Get_size(), out=half)  # divide in fp32, round once into the half type
        collectives.allreduce(half, comm, algorithm, "sum")
        with self._computing():
            bucket.copy_(half)

    def reduce_scatter_(self, bucket, key, comm, algorithm, step):
        comm = comm or world.WORLD
        if bucket.dtype == self.dtype:
            collectives.reduce_scatter(bucket, comm, "avg", algorithm)
            return
        half = self._half_buffer(bucket, key)
        with self._computing():
            torch.div(bucket, comm.Get_size(), out=half)
        mine = collectives.reduce_scatter(half, comm, "sum", algorithm)
        lo = mine.data_ptr() - half.data_ptr()
        with self._computing():  # only this rank's shard is needed (the optimizer steps it)
            bucket[lo // half.element_size():lo // half.element_size() + mine.numel()].copy_(mine)


class _ErrorFedCompressor(Compressor):
    """What ``topk`` and ``sign`` share: per-bucket state and its checkpoint, scratch, the
    one-message allgather, local clip, and the one-time notice that a bucket goes dense.
    Subclasses hold ``_state`` (per bucket: a ``_STATE`` dataclass with ``numel``, the tensors
    named in ``_STATE_TENSORS`` and a ``buffers`` dict) and ``_dense_reported``, and say which
    tensors a new bucket needs (``_new_state_tensors``)."""

    local_clip = 0.0
    _STATE: type
    _STATE_TENSORS: tuple[str, ...]
    _new_state_tensors: Callable[[], dict[str, bool]]  # which of _STATE_TENSORS a new bucket needs

    def state_dict(self) -> dict:
        """Per bucket: the tensors this rank holds (residual, moments); they differ per rank."""
        return {"buckets": {key: {name: getattr(s, name) for name in self._STATE_TENSORS}
                            for key, s in self._state.items()},
                "dense_reported": self._dense_reported}

    def load_state_dict(self, state: dict) -> None:
        self._state = {}
        for key, saved in state.get("buckets", {}).items():
            tensors = {name: saved.get(name) for name in self._STATE_TENSORS}
            like = next((t for t in tensors.values() if t is not None), None)
            if like is None:  # no error feedback, no moments: nothing to continue (the bucket starts afresh)
                continue
            self._state[int(key)] = self._STATE(
                numel=like.numel(), **{name: None if t is None else t.clone() for name, t in tensors.items()})
        self._dense_reported = bool(state.get("dense_reported", False))

    def _bucket_state(self, key: int, bucket: torch.Tensor):
        """This bucket's state, made on first use; ValueError if the bucket changed size."""
        state = self._state.get(key)
        if state is None:
            wanted = self._new_state_tensors()
            state = self._state[key] = self._STATE(numel=bucket.numel(), **{
                name: torch.zeros(bucket.numel(), dtype=torch.float32, device=bucket.device) if wanted[name] else None
                for name in self._STATE_TENSORS})
        elif state.numel != bucket.numel():
            raise ValueError(f"{self.name}: bucket {key} changed size from {state.numel} to {bucket.numel()} elements")
        return state

    def _buffer(self, state, name: str, numel: int, dtype=torch.int32, device="cpu") -> torch.Tensor:
        """A per-bucket scratch buffer grown to the largest size asked for (k shrinks in warm-up)."""
        buf = state.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = state.buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def _on_wire(self, state, t: torch.Tensor, name: str) -> torch.Tensor:
        """``t`` itself when MPI can read it, else a host copy (CUDA without CUDA-aware MPI)."""
        if not t.is_cuda or world.cuda_aware():
            return t
        host = self._buffer(state, name, t.numel(), t.dtype)
        host.copy_(t)  # synchronous device-to-host copy: the data is complete when MPI reads it
        return host

    def _allgather_(self, state, message: torch.Tensor, comm) -> torch.Tensor:
        """Every rank's ``message`` (the same length on every rank), as rows [p, len] in rank order,
        on ``message``'s device. SYNC: blocks until every rank has contributed."""
        p, length = comm.Get_size(), message.numel()
        wire = self._on_wire(state, message, "message_host")
        gathered = self._buffer(state, "gathered", p * length, wire.dtype, wire.device)
        if p > 1:
            p2p.device_sync(wire)  # CUDA-aware MPI reads what the compressor just wrote: let it finish
            memory, _, datatype = world.buf(gathered)
            # receive spec: ``length`` elements from each rank
            p2p.private_comm(comm).Allgather(world.buf(wire), [memory, length, datatype])
            moved = length * wire.element_size() * (p - 1)
            world.traffic.add(sent=moved, received=moved)
        else:
            gathered.copy_(wire)
        if gathered.device != message.device:
            gathered = gathered.to(message.device)
        return gathered.view(p, length)

    def _clip_local_(self, bucket: torch.Tensor, p: int) -> None:
        """DGC's local clipping: this rank's bucket scaled to an L2 norm of at most local_clip / sqrt(p)."""
        limit = self.local_clip / math.sqrt(p)
        # stays a tensor: no host sync on CUDA
        bucket.mul_(torch.clamp(limit / (bucket.norm() + 1e-6), max=1.0))

    def _report_dense_once(self, comm, text: str) -> None:
        if self._dense_reported:
            return
        self._dense_reported = True
        if comm.Get_rank() == 0:
            print(f"warning: {text} (further dense buckets are not reported)", flush=True)


@dataclass
class _TopkState:
    """Per-bucket state of the top-k compressor."""

    numel: int
    residual: torch.Tensor | None
    velocity: torch.Tensor | None
    second_moment: torch.Tensor | None = None  # precondition: this rank's own Adam v
    # packed pairs [k int32 indices | k fp32 values as int32 bits], grown to the largest k seen
    pack: torch.Tensor | None = None
    buffers: dict = field(default_factory=dict)


class TopK(_ErrorFedCompressor):
    name = "topk"
    _STATE, _STATE_TENSORS = _TopkState, ("residual", "velocity", "second_moment")

    def __init__(self, ratio: float, error_feedback: bool, aggregate: str, momentum_correction: bool,
                 momentum: float, local_clip: float, warmup_steps: int, dense_steps: int = 0,
                 precondition: tuple[float, float] | None = None, first_moment: float = 0.0):
        self.ratio = ratio
        self.error_feedback = error_feedback
        self.aggregate = aggregate
        self.local_clip = local_clip
        self.warmup_steps = warmup_steps
        self.dense_steps = dense_steps
        self.precondition = precondition
        # a velocity: DGC's u = m u + g (zeroed where sent), or Adam's first moment u = b1 u + (1 - b1) g~
        # (first_moment=b1, kept whole)
        self.momentum_correction = momentum_correction or first_moment > 0
        self.momentum = first_moment if first_moment > 0 else momentum
        self.velocity_gain = 1.0 - first_moment if first_moment > 0 else 1.0
        self.mask_velocity = momentum_correction
        self._state: dict[int, _TopkState] = {}
        self._dense_reported = False
        kernels.load()  # build or load now (serialised across the ranks of a node), not in step 1

    def describe(self) -> str:
        parts = [f"topk: density {self.ratio:g} (k = ceil(density x n) per bucket)",
                 "error feedback" if self.error_feedback else "no error feedback (unsent entries dropped)"]
        if self.aggregate == "gtopk":
            parts.append("gtopk: global top-k by recursive doubling, 2k lg p pairs per rank")
        else:
            parts.append("allgather of (int32 index, fp32 value) pairs")
        if self.precondition is not None:
            parts.append(f"each rank's gradient divided by the root of its own Adam second moment before "
                         f"selection (beta2={self.precondition[0]:g})")
        if self.momentum_correction and not self.mask_velocity:
            parts.append(f"Adam's first moment (beta1={self.momentum:g}) accumulated and sent; optimizer runs "
                         "without momentum")
        elif self.momentum_correction:
            parts.append(f"DGC momentum correction (m={self.momentum:g}; optimizer runs without momentum)")
        if self.dense_steps > 0:
            parts.append(f"dense for the first {self.dense_steps} steps")
        if self.local_clip > 0:
            parts.append(f"local clip {self.local_clip:g}/sqrt(p) per bucket")
        if self.warmup_steps > 0:
            parts.append(f"density warm-up 25% -> {self.ratio:g} over {self.warmup_steps} steps")
        parts.append(f"kernels: {kernels.status()}")
        return ", ".join(parts)

    def density(self, step: int) -> float:
        return density_at(step, self.ratio, self.warmup_steps)

    def reduce_scatter_(self, bucket, key, comm, algorithm, step):
        raise ValueError("topk: the sparse exchange has no reduce-scatter half (ZeRO-1 needs --compress none|fp16|bf16)")

    # ------------------------------------------------------------ per-step entry point
    def allreduce_(self, bucket, key, comm, algorithm, step):
        comm = comm or world.WORLD
        if bucket.dtype != torch.float32:
            raise TypeError(f"topk compression needs float32 gradient buckets, got {bucket.dtype}")
        n = bucket.numel()
        if n == 0:
            return
        p = comm.Get_size()
        state = self._bucket_state(key, bucket)
        k = topk_count(n, self.density(step))
        warming = step < self.dense_steps
        with self._computing():
            if self.local_clip > 0:
                self._clip_local_(bucket, p)
            if self.precondition is not None:
                self._precondition_(bucket, state, step)
        if warming or goes_dense(n, k, p, self.aggregate):
            if not warming:
                self._report_dense(comm, key, n, k, p)
            self._dense_(bucket, state, comm, algorithm)
            return
        with self._computing():
            if self.momentum_correction:
                self._accumulate_velocity_(state, bucket)
                source = state.velocity
            else:
                source = bucket
            idx, val = self._select(source, state, k)
        if self.aggregate == "gtopk":
            delivered = self._gtopk_exchange_(bucket, state, idx, val, k, comm)
        else:
            self._allgather_exchange_(bucket, state, k, comm)
            delivered = idx
        if self.mask_velocity:
            state.velocity.index_fill_(0, delivered.long(), 0.0)  # DGC momentum factor masking

    # ------------------------------------------------------------ pieces
    def _new_state_tensors(self) -> dict[str, bool]:
        return {"residual": self.error_feedback, "velocity": self.momentum_correction,
                "second_moment": self.precondition is not None}

    def _precondition_(self, bucket: torch.Tensor, state: _TopkState, step: int) -> None:
        """``adam_normalise_`` with this bucket's own second moment (this rank's, differs per rank)."""
        v = state.second_moment
        adam_normalise_(bucket, v, self._buffer(state, "denom", v.numel(), torch.float32, v.device), step,
                        *self.precondition)

    def _accumulate_velocity_(self, state: _TopkState, bucket: torch.Tensor) -> None:
        """u = m u + g (DGC), or u = b1 u + (1 - b1) g (Adam's first moment, ``first_moment``)."""
        if self.velocity_gain == 1.0:
            state.velocity.mul_(self.momentum).add_(bucket)
        else:
            state.velocity.mul_(self.momentum).add_(bucket, alpha=self.velocity_gain)

    def _report_dense(self, comm, key, n, k, p) -> None:
        self._report_dense_once(comm, f"topk: bucket {key} ({n} elements, k={k}) goes dense at {p} ranks: the "
                                      f"sparse {self.aggregate} would send {sparse_bytes(k, p, self.aggregate)} bytes "
                                      f"per rank, a dense allreduce {dense_bytes(n, p)}")

    def _dense_(self, bucket, state, comm, algorithm) -> None:
        """Dense transport with the same bookkeeping: everything held back is sent now."""
        if self.momentum_correction:
            self._accumulate_velocity_(state, bucket)
            bucket.copy_(state.velocity)
            if self.mask_velocity:  # DGC: everything is sent; Adam's first moment stays whole
                state.velocity.zero_()
        if self.error_feedback:
            bucket.add_(state.residual)
            state.residual.zero_()
        collectives.allreduce(bucket, comm, algorithm, "avg")

    def _pack(self, state: _TopkState, k: int, device) -> torch.Tensor:
        if state.pack is None or state.pack.numel() < 2 * k:
            state.pack = torch.empty(2 * k, dtype=torch.int32, device=device)
        return state.pack[: 2 * k]

    def _select(self, source: torch.Tensor, state: _TopkState, k: int):
        """k pairs written straight into the pack buffer: int32 indices, then fp32 values."""
        pack = self._pack(state, k, source.device)
        out_idx, out_val = pack[:k], pack[k:].view(torch.float32)
        if self.error_feedback:
            kernels.residual_topk(source, state.residual, k, out_idx, out_val)
        else:
            kernels.topk(source, k, out_idx, out_val)
        return out_idx, out_val

    def _allgather_exchange_(self, bucket, state, k, comm) -> None:
        rows = self._allgather_(state, self._pack(state, k, bucket.device), comm)  # SYNC
        p = rows.shape[0]
        with self._computing():
            bucket.zero_()
            for r in range(p):  # rank order: every rank adds the same values in the same order
                kernels.sparse_accumulate(bucket, rows[r, :k], rows[r, k:].view(torch.float32))
            bucket.div_(p)

    def _gtopk_exchange_(self, bucket, state, idx, val, k, comm) -> torch.Tensor:
        """Global top-k by recursive doubling; returns this rank's delivered indices.

        Ranks, partners and the fold-in come from ``p2p.group`` (the same power-of-two core as
        the rhd and tree allreduces): a rank that sits out hands its pairs to the rank above it.
        """
        p = comm.Get_size()
        own_idx, own_val = idx.clone(), val.clone()
        alive = torch.ones(k, dtype=torch.bool, device=bucket.device)
        cur_idx, cur_val = idx, val
        if p > 1:
            grp = p2p.group(comm)
            if grp.newrank < 0:  # sits out: hand the pairs to the rank above, get the final set back
                cur_idx, cur_val, alive = self._gtopk_folded(state, grp.comm, grp.rank + 1, own_idx, own_val, k)
            else:
                folded = None
                if grp.rank < 2 * grp.rem:  # proxy of the rank below: its pairs merge first (lower rank first)
                    their_idx, their_val = self._recv_pairs(state, grp.comm, grp.rank - 1, k)
                    cur_idx, cur_val = _merge_top(their_idx, their_val, cur_idx, cur_val, k)
                    folded = (their_idx, torch.isin(their_idx, cur_idx, assume_unique=True))
                    alive &= torch.isin(own_idx, cur_idx, assume_unique=True)
                for partner in grp.doubling_partners:
                    their_idx, their_val = self._swap_pairs(state, grp.comm, partner, cur_idx, cur_val, k)
                    if grp.rank < partner:  # both partners add in the same order: identical bits
                        cur_idx, cur_val = _merge_top(cur_idx, cur_val, their_idx, their_val, k)
                    else:
                        cur_idx, cur_val = _merge_top(their_idx, their_val, cur_idx, cur_val, k)
                    alive &= torch.isin(own_idx, cur_idx, assume_unique=True)
                    if folded is not None:
                        folded = (folded[0], folded[1] & torch.isin(folded[0], cur_idx, assume_unique=True))
                if folded is not None:
                    self._return_to_folded(state, grp.comm, grp.rank - 1, cur_idx, cur_val, folded[1], k)
        with self._computing():
            bucket.zero_()
            kernels.sparse_accumulate(bucket, cur_idx, cur_val)
            bucket.div_(p)
            if self.error_feedback:
                dropped = ~alive
                # own pairs that did not survive go back where they came from (their residual slots are 0)
                kernels.sparse_accumulate(state.residual, own_idx[dropped], own_val[dropped])
        return own_idx[alive]

    # gtopk messages: one packed [k indices | k values] buffer each way per round
    def _packed(self, state, name, cur_idx, cur_val, k, device) -> torch.Tensor:
        out = self._buffer(state, name, 2 * k, device=device)
        out[:k].copy_(cur_idx)
        out[k:].view(torch.float32).copy_(cur_val)
        return out

    def _unpacked(self, packed: torch.Tensor, k: int, device):
        packed = packed.to(device)
        return packed[:k].clone(), packed[k:].view(torch.float32).clone()

    def _wire_device(self, t: torch.Tensor):
        return t.device if (not t.is_cuda or world.cuda_aware()) else torch.device("cpu")

    def _swap_pairs(self, state, wire, partner, cur_idx, cur_val, k):
        device = self._wire_device(cur_idx)
        send = self._packed(state, "send", cur_idx, cur_val, k, device)
        recv = self._buffer(state, "recv", 2 * k, device=device)
        p2p.device_sync(send)
        # blocks until the partner has sent its set and taken ours
        wire.Sendrecv(world.buf(send), partner, _TAG_GTOPK, world.buf(recv), partner, _TAG_GTOPK)
        world.traffic.add(sent=PAIR_BYTES * k, received=PAIR_BYTES * k)
        return self._unpacked(recv, k, cur_idx.device)

    def _recv_pairs(self, state, wire, source, k):
        device = self._wire_device(state.pack)
        recv = self._buffer(state, "recv", 2 * k, device=device)
        wire.Recv(world.buf(recv), source, _TAG_GTOPK)  # blocks until the folded rank has sent
        world.traffic.add(received=PAIR_BYTES * k)
        return self._unpacked(recv, k, state.pack.device)

    def _return_to_folded(self, state, wire, dest, cur_idx, cur_val, their_alive, k):
        device = self._wire_device(cur_idx)
        send = self._packed(state, "send", cur_idx, cur_val, k, device)
        flags = self._buffer(state, "flags", k, dtype=torch.uint8, device=device)
        flags.copy_(their_alive)
        p2p.device_sync(send)
        wire.Send(world.buf(send), dest, _TAG_GTOPK)  # blocks until the folded rank receives
        wire.Send(world.buf(flags), dest, _TAG_GTOPK + 1)
        world.traffic.add(sent=PAIR_BYTES * k + k)

    def _gtopk_folded(self, state, wire, proxy, own_idx, own_val, k):
        device = self._wire_device(own_idx)
        send = self._packed(state, "send", own_idx, own_val, k, device)
        p2p.device_sync(send)
        wire.Send(world.buf(send), proxy, _TAG_GTOPK)  # blocks until the proxy receives
        recv = self._buffer(state, "recv", 2 * k, device=device)
        flags = self._buffer(state, "flags", k, dtype=torch.uint8, device=device)
        wire.Recv(world.buf(recv), proxy, _TAG_GTOPK)  # blocks until the proxy has finished its rounds
        wire.Recv(world.buf(flags), proxy, _TAG_GTOPK + 1)
        world.traffic.add(sent=PAIR_BYTES * k, received=PAIR_BYTES * k + k)
        cur_idx, cur_val = self._unpacked(recv, k, own_idx.device)
        return cur_idx, cur_val, flags.to(own_idx.device).bool()


@dataclass
class _SignState:
    """Per-bucket state of the sign compressor: each tensor the bucket's length, or None when unused."""

    numel: int
    residual: torch.Tensor | None  # error feedback: what this rank still owes
    first_moment: torch.Tensor | None = None  # AdamW: this rank's u
    second_moment: torch.Tensor | None = None  # AdamW: this rank's v
    buffers: dict = field(default_factory=dict)


class ScaledSign(_ErrorFedCompressor):
    """``sign``: 1 bit per element plus one fp32 scale per chunk, with error feedback (module docstring)."""

    name = "sign"
    _STATE, _STATE_TENSORS = _SignState, ("residual", "first_moment", "second_moment")

    def __init__(self, chunk: int, error_feedback: bool, precondition: tuple[float, float] | None = None,
                 first_moment: float = 0.0, local_clip: float = 0.0, sqrt_ranks_gain: bool = False):
        self.chunk = chunk
        self.sqrt_ranks_gain = sqrt_ranks_gain
        self.error_feedback = error_feedback
        self.precondition = precondition
        self.first_moment = first_moment
        self.local_clip = local_clip
        self._state: dict[int, _SignState] = {}
        self._dense_reported = False

    def describe(self) -> str:
        per = f"per {self.chunk} elements" if self.chunk > 0 else "per bucket"
        parts = [f"sign: 1 bit per element + one fp32 scale (mean |x|) {per}, allgathered",
                 "error feedback" if self.error_feedback else "no error feedback (what a scale x sign misses is dropped)"]
        if self.precondition is not None:
            parts.append(f"each rank's gradient divided by the root of its own Adam second moment "
                         f"(beta2={self.precondition[0]:g})")
        if self.sqrt_ranks_gain:
            parts.append("times sqrt(ranks)")
        if self.first_moment > 0:
            parts.append(f"Adam's first moment (beta1={self.first_moment:g}) accumulated and sent; optimizer "
                         "runs without momentum")
        if self.local_clip > 0:
            parts.append(f"local clip {self.local_clip:g}/sqrt(p) per bucket")
        return ", ".join(parts)

    def reduce_scatter_(self, bucket, key, comm, algorithm, step):
        raise ValueError("sign: the allgathered bits have no reduce-scatter half (ZeRO-1 needs --compress none|fp16|bf16)")

    # ------------------------------------------------------------ per-step entry point
    def allreduce_(self, bucket, key, comm, algorithm, step):
        comm = comm or world.WORLD
        if bucket.dtype != torch.float32:
            raise TypeError(f"sign compression needs float32 gradient buckets, got {bucket.dtype}")
        n = bucket.numel()
        if n == 0:
            return
        p = comm.Get_size()
        state = self._bucket_state(key, bucket)
        with self._computing():  # bucket becomes e: everything this rank owes
            if self.local_clip > 0:
                self._clip_local_(bucket, p)
            if self.precondition is not None:
                adam_normalise_(bucket, state.second_moment, self._buffer(state, "denom", n, torch.float32, bucket.device),
                                step, *self.precondition)
                if self.sqrt_ranks_gain:  # this rank's v holds p times the noise of the averaged gradient's
                    bucket.mul_(math.sqrt(p))
            if self.first_moment > 0:
                state.first_moment.mul_(self.first_moment).add_(bucket, alpha=1.0 - self.first_moment)
                bucket.copy_(state.first_moment)
            if self.error_feedback:
                bucket.add_(state.residual)
        if p > 1 and sign_bytes(n, self.chunk, p) >= dense_bytes(n, p):
            self._report_dense_once(comm, f"sign: bucket {key} ({n} elements) goes dense at {p} ranks: the "
                                          f"allgather would send {sign_bytes(n, self.chunk, p)} bytes per rank, "
                                          f"a dense allreduce {dense_bytes(n, p)}")
            if self.error_feedback:  # everything owed is sent now
                state.residual.zero_()
            collectives.allreduce(bucket, comm, algorithm, "avg")
            return
        with self._computing():
            message = self._encode(state, bucket)
            mine = self._decode(state, message, n, "mine")  # exactly what every rank will add for this rank
            if self.error_feedback:
                torch.sub(bucket, mine, out=state.residual)
        rows = self._allgather_(state, message, comm)  # SYNC
        with self._computing():
            bucket.zero_()
            for r in range(p):  # rank order: every rank adds the same values in the same order
                bucket.add_(mine if r == comm.Get_rank() else self._decode(state, rows[r], n, "theirs"))
            bucket.div_(p)

    # ------------------------------------------------------------ pieces
    def _new_state_tensors(self) -> dict[str, bool]:
        return {"residual": self.error_feedback, "first_moment": self.first_moment > 0,
                "second_moment": self.precondition is not None}

    def _layout(self, n: int) -> tuple[int, int, int]:
        """(elements per chunk, chunks, bytes of bits) of an n-element bucket."""
        chunk = sign_chunk_of(n, self.chunk)
        return chunk, -(-n // chunk), -(-n // 8)

    def _bit_weights(self, state, device) -> torch.Tensor:
        weights = state.buffers.get("bit_weights")
        if weights is None:
            weights = state.buffers["bit_weights"] = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8,
                                                                  device=device)
        return weights

    def _encode(self, state, e: torch.Tensor) -> torch.Tensor:
        """The message [chunks fp32 scales | ceil(n/8) bytes of sign bits] of ``e``, as uint8."""
        n = e.numel()
        chunk, chunks, nbytes = self._layout(n)
        message = self._buffer(state, "message", 4 * chunks + nbytes, torch.uint8, e.device)
        scales = message[: 4 * chunks].view(torch.float32)
        magnitude = self._buffer(state, "magnitude", chunks * chunk, torch.float32, e.device)
        torch.abs(e, out=magnitude[:n])
        magnitude[n:].zero_()
        torch.sum(magnitude.view(chunks, chunk), dim=1, out=scales)
        scales[: chunks - 1].div_(chunk)
        scales[chunks - 1:].div_(n - (chunks - 1) * chunk)  # the last chunk may be shorter
        bits = self._buffer(state, "bits", nbytes * 8, torch.uint8, e.device)
        bits[:n].copy_(e >= 0)
        bits[n:].zero_()
        torch.sum(bits.view(nbytes, 8) * self._bit_weights(state, e.device), dim=1, dtype=torch.uint8,
                  out=message[4 * chunks:])
        return message

    def _decode(self, state, message: torch.Tensor, n: int, name: str) -> torch.Tensor:
        """+-scale per element from one rank's message, into the scratch buffer ``name`` (n floats)."""
        chunk, chunks, nbytes = self._layout(n)
        scales = self._buffer(state, "scales", chunks, torch.float32, message.device)
        scales.view(torch.uint8).copy_(message[: 4 * chunks])  # a peer's row need not start 4-byte aligned
        padded = max(nbytes * 8, chunks * chunk)
        positive = self._buffer(state, "positive", padded, torch.bool, message.device)
        torch.ne(message[4 * chunks:].unsqueeze(1) & self._bit_weights(state, message.device), 0,
                 out=positive[: nbytes * 8].view(nbytes, 8))
        out = self._buffer(state, name, chunks * chunk, torch.float32, message.device)
        torch.where(positive[: chunks * chunk].view(chunks, chunk), scales[:, None], -scales[:, None],
                    out=out.view(chunks, chunk))
        return out[:n]


def _merge_top(first_idx, first_val, second_idx, second_val, k):
    """Union of two sparse sets (duplicate indices summed, ``first`` added first), then its top k.

    Both inputs have unique indices; the result comes out in increasing index order.
    """
    union, slot = torch.unique(torch.cat([first_idx, second_idx]), sorted=True, return_inverse=True)
    summed = torch.zeros(union.numel(), dtype=torch.float32, device=union.device)
    kernels.sparse_accumulate(summed, slot.to(torch.int32), torch.cat([first_val, second_val]))
    pos, val = kernels.topk(summed, k)
    return union[pos.long()], val


# ---------------------------------------------------------------- construction
def make_compressor(name: str, *, topk_ratio: float = 0.01, error_feedback: bool = True,
                    aggregate: str = "allgather", momentum_correction: bool = False, momentum: float = 0.9,
                    local_clip: float = 0.0, warmup_steps: int = 0, dense_steps: int = 0,
                    precondition: tuple[float, float] | None = None, first_moment: float = 0.0,
                    sign_chunk: int = SIGN_CHUNK_DEFAULT, sqrt_ranks_gain: bool = False) -> Compressor:
    """The compressor ``name`` (one of COMPRESSORS).

    The options are checked where the user gives them (``config.check``, before any data loads);
    here a value no option could produce is a programming error (ValueError).
    """
    if name == "none":
        return Compressor()
    if name in ("fp16", "bf16"):
        return HalfPrecision(torch.float16 if name == "fp16" else torch.bfloat16)
    if name == "sign":  # the top-k-only options (ratio, aggregate, DGC momentum, warm-ups) do not apply
        if (sign_chunk < 0 or momentum_correction or dense_steps or not 0 <= first_moment < 1
                or (sqrt_ranks_gain and precondition is None)
                or (first_moment > 0 and (precondition is None or not error_feedback))):
            raise ValueError(f"sign: inconsistent options chunk={sign_chunk} momentum_correction={momentum_correction} "
                             f"error_feedback={error_feedback} precondition={precondition} first_moment={first_moment}")
        return ScaledSign(int(sign_chunk), bool(error_feedback),
                          None if precondition is None else (float(precondition[0]), float(precondition[1])),
                          float(first_moment), float(local_clip), bool(sqrt_ranks_gain))
    if name != "topk":
        raise ValueError(f"unknown compressor {name!r}: expected one of {', '.join(COMPRESSORS)}")
    velocity = momentum_correction or first_moment > 0
    if (not 0 < topk_ratio <= 1 or aggregate not in TOPK_AGGREGATES or (velocity and not error_feedback)
            or (first_moment > 0 and (momentum_correction or precondition is None)) or not 0 <= first_moment < 1):
        raise ValueError(f"topk: inconsistent options ratio={topk_ratio} aggregate={aggregate!r} "
                         f"momentum_correction={momentum_correction} error_feedback={error_feedback} "
                         f"precondition={precondition} first_moment={first_moment}")
    return TopK(float(topk_ratio), bool(error_feedback), aggregate, bool(momentum_correction),
                float(momentum), float(local_clip), int(warmup_steps), int(dense_steps),
                None if precondition is None else (float(precondition[0]), float(precondition[1])),
                float(first_moment))
