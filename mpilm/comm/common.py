"""Leaf helpers every collective module shares; imports nothing of mpilm (torch only).

The collectives import one way (``collectives.py`` at the top, this file at the bottom)::

    common  <-  p2p, shm, tuning          (world beside them: MPI start-up, buffers, traffic)
    p2p     <-  ring, rhd, tree, mpi
    shm, ring, rhd  <-  hier
    mpi, p2p        <-  staging
    everything      <-  collectives (the dispatcher)

What lives here, each defined once:
- the algorithm names: ``ALGORITHMS`` (what ``allreduce`` accepts), ``CHOOSABLE`` (what ``auto``
  may pick), ``REDUCE_SCATTER_ALGORITHMS`` (what the halves accept), ``HOST_ONLY`` (algorithms
  with no device path), ``OPS``;
- ``shard_bounds`` / ``shard_counts``: the one definition of which slice a rank owns;
- half types (``HALF_TYPES``, ``reduce_dtype``, ``widened``): MPI never reduces float16 or
  bfloat16, so they travel as raw 16-bit words and are added by torch, in fp32 where widened;
- ``check_op`` / ``check``: the argument checks (op, algorithm, 1-D contiguous, dtype), raising
  ``ValueError`` with the caller's name;
- ``SEGMENT_BYTES``, ``segment_elems``, ``segments``: how ranges are cut into messages (read at
  call time, so ``common.SEGMENT_BYTES = ...`` changes every algorithm at once, as the bench's
  ``--segment-bytes`` does);
- ``scratch``: cached work buffers, per thread, so a communication thread and the main thread
  never share one;
- ``finish``: the divide of ``op="avg"``.
"""

from __future__ import annotations

import threading

import torch

ALGORITHMS = ("ring", "rhd", "tree", "shm", "hier", "mpi", "auto")
CHOOSABLE = tuple(name for name in ALGORITHMS if name != "auto")  # what a tuning file may name
# the halves (reduce_scatter / allgather): every one gives rank r the shard_bounds slice r
REDUCE_SCATTER_ALGORITHMS = ("ring", "rhd", "shm", "hier", "mpi", "auto")
HOST_ONLY = ("shm", "hier")  # no device path (no CUDA IPC): CUDA buffers take the ring
OPS = ("sum", "avg")

HALF_TYPES = (torch.float16, torch.bfloat16)

# Message size for pipelining, shared by ring, rhd, tree and the host staging. Large enough that
# per-message overhead (Python + MPI, ~10 us) stays small against the transfer, small enough that
# a receive slot stays in cache while it is added and that the pipeline fills quickly. On the
# development machine (2 ranks, 2-256 MiB messages, ``--segment-bytes`` sweep) 1 and 2 MiB tied,
# 256 KiB was up to 25% slower and 4 MiB lost at 16 MiB. Sender and receiver must agree: it is a
# replicated setting (override per call with ``segment_bytes=`` or here, on every rank).
SEGMENT_BYTES = 1 << 20


def shard_bounds(n: int, p: int, r: int) -> tuple[int, int]:
    """Rank r's contiguous slice of n elements split over p ranks (sizes differ by at most 1)."""
    return r * n // p, (r + 1) * n // p


def shard_counts(n: int, p: int) -> tuple[list[int], list[int]]:
    """``(counts, displacements)`` of every rank's ``shard_bounds`` slice, for MPI's v-collectives."""
    bounds = [shard_bounds(n, p, q) for q in range(p)]
    return [hi - lo for lo, hi in bounds], [lo for lo, _ in bounds]


# ---------------------------------------------------------------- half types
def is_half(dtype: torch.dtype) -> bool:
    return dtype in HALF_TYPES


def reduce_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are formed in when a reduction widens: fp32 for the half types."""
    return torch.float32 if dtype in HALF_TYPES else dtype


def widened(t: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of a half-typed tensor (for MPI to reduce), else ``t`` itself."""
    return t.float() if t.dtype in HALF_TYPES else t


# ---------------------------------------------------------------- argument checks
def check_op(op: str, what: str = "allreduce") -> None:
    if op not in OPS:
        raise ValueError(f"{what}: op {op!r}: expected 'sum' or 'avg'")


def check(buf: torch.Tensor, what: str, op: str = "sum", algorithm: str | None = None,
          choices: tuple[str, ...] = ALGORITHMS, dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    """ValueError naming ``what`` unless ``op`` is sum/avg, ``algorithm`` (if given) is one of
    ``choices``, ``buf`` is 1-D and contiguous, and its dtype is one of ``dtypes`` (if given)."""
    check_op(op, what)
    if algorithm is not None and algorithm not in choices:
        raise ValueError(f"{what}: algorithm {algorithm!r}: expected one of {', '.join(choices)}")
    if buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(f"{what}: expected a 1-D contiguous tensor, got shape {tuple(buf.shape)}")
    if dtypes is not None and buf.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{what}: dtype {buf.dtype} is not supported (use one of {names})")


# ---------------------------------------------------------------- segments
def segment_elems(itemsize: int, segment_bytes: int | None = None) -> int:
    """Elements of ``itemsize`` bytes per message: ``segment_bytes`` (default ``SEGMENT_BYTES``) worth."""
    size = SEGMENT_BYTES if segment_bytes is None else segment_bytes
    if size < 1:
        raise ValueError(f"segment_bytes={size}: must be >= 1")
    return max(1, size // itemsize)


def segments(lo: int, hi: int, seg: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut into messages of ``seg`` elements (the last one shorter).

    Sender and receiver of a range both call it with the same arguments, so their messages
    match one to one.
    """
    return [(a, min(a + seg, hi)) for a in range(lo, hi, seg)]


# ---------------------------------------------------------------- scratch buffers
_local = threading.local()


def scratch(kind, numel: int, dtype: torch.dtype, device: torch.device, pinned: bool = False) -> torch.Tensor:
    """A cached buffer of ``numel`` elements (a view of a larger one), for receives and staging.

    One allocation per (thread, kind, device, dtype, pinned), grown geometrically when a larger
    one is asked for, so hot paths do not allocate. ``pinned``: a host buffer, page-locked when
    ``device`` is CUDA (the staging wire buffers). Per thread, so a communication thread and the
    main thread (each on its own communicator) never share a buffer. The previous allocation
    stays valid for as long as a view of it is held.
    """
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    device = torch.device(device)
    key = (kind, device, dtype, pinned)
    held = cache.get(key)
    if held is None or held.numel() < numel:
        grown = max(numel, 1, 2 * held.numel() if held is not None else 0)
        if pinned:
            held = torch.empty(grown, dtype=dtype, pin_memory=device.type == "cuda")
        else:
            held = torch.empty(grown, dtype=dtype, device=device)
        cache[key] = held
    return held[:numel]


# ---------------------------------------------------------------- op="avg"
_divisors: dict = {}
_divisors_lock = threading.Lock()


def finish(t: torch.Tensor, p: int, op: str) -> torch.Tensor:
    """Divide by the world size for ``op="avg"`` (in place); returns ``t``.

    fp32/fp64 divide by a cached 0-dim tensor of their own dtype: the same correctly rounded
    quotient as ``div_(p)`` (p is exact in both) without torch wrapping a Python number on every
    call, which costs more than the division itself on small buckets. Half types divide by the
    Python number, which torch applies in fp32 (a half-typed divisor would round p above 256/2048).
    """
    if op == "avg" and p > 1:
        if t.dtype in (torch.float32, torch.float64):
            key = (p, t.dtype)
            divisor = _divisors.get(key)
            if divisor is None:
                with _divisors_lock:
                    divisor = _divisors.setdefault(key, torch.tensor(float(p), dtype=t.dtype))
            t.div_(divisor)
        else:
            t.div_(p)
    return t


# Waiting politely: MPI's own Wait busy-polls, which is right for a thread that has nothing else
# to do, and wrong for a communication thread that shares its cores with backward: a spinning
# waiter takes half a core from the computation it is meant to hide behind. A thread that calls
# ``poll_politely(seconds)`` waits by testing its requests (``p2p.wait``) or its peers' flags
# (``shm``) and sleeping ``seconds`` between tests (the kernel keeps sending from the socket
# buffers meanwhile, and a thread waking from a sleep is scheduled ahead of a busy one).
_waiting = threading.local()


def poll_politely(seconds: float | None) -> None:
    """This thread's waits: test-and-sleep every ``seconds`` (None: busy-poll, as MPI does)."""
    _waiting.sleep = seconds


def polite_sleep() -> float | None:
    """The calling thread's test-and-sleep period, or None when it busy-polls."""
    return getattr(_waiting, "sleep", None)
