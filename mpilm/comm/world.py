"""MPI start-up and the border between torch tensors and MPI buffers.

What it does:
- ``rank()``, ``size()``, ``node_comm()`` / ``local_rank()`` (ranks sharing a node, from
  ``COMM_TYPE_SHARED``; ``MPILM_RANKS_PER_NODE=k`` splits the world into fake nodes of k ranks
  so node-aware code can be tested on one machine), ``pick_device()``.
- ``buf(t)``: a zero-copy mpi4py buffer spec ``[memory, count, datatype]`` for a contiguous
  tensor (CPU via numpy, CUDA via ``__cuda_array_interface__``; bfloat16 travels as raw 16-bit
  words because MPI has no bf16 type, so never let MPI *reduce* a bf16 buffer).
- ``placement()``: this rank's node, cores (its affinity mask) and compute threads (the mask
  shared out over the node's ranks that overlap it; ``OMP_NUM_THREADS`` / ``SLURM_CPUS_PER_TASK``
  win); ``node_lines()`` the banner's one line per node.
- ``cuda_aware()``: whether the MPI library can take device pointers.
- ``traffic``: bytes this rank handed to / received from point-to-point calls, so compression
  ratios are measured rather than computed.
- ``run_main(fn)``: the error policy of every entry point: ``UsageError`` -> ``error: ...`` and
  exit 2; any other exception -> ``[rank r]`` traceback and ``MPI.COMM_WORLD.Abort`` so the job
  never hangs on a dead rank.

What it does not: no collectives (``collectives.py``), no knowledge of models or data.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import traceback
from dataclasses import dataclass

import torch
from mpi4py import MPI

from mpilm.errors import UsageError

WORLD = MPI.COMM_WORLD

# torch dtype -> MPI datatype. bfloat16 has no MPI type: it moves as raw 16-bit words and is
# reduced by torch on our side (collectives must never pass MPI.SUM over it).
_MPI_TYPES = {
    torch.float32: MPI.FLOAT,
    torch.float64: MPI.DOUBLE,
    torch.float16: MPI.UINT16_T,  # MPI's float16 is an optional extension; move raw, add in torch
    torch.bfloat16: MPI.UINT16_T,
    torch.int32: MPI.INT32_T,
    torch.int64: MPI.INT64_T,
    torch.uint8: MPI.UINT8_T,
    torch.int8: MPI.INT8_T,
}
# dtypes that MPI itself can reduce correctly with MPI.SUM
MPI_REDUCIBLE = (torch.float32, torch.float64, torch.int32, torch.int64)


def rank(comm: MPI.Comm | None = None) -> int:
    return (comm or WORLD).Get_rank()


def size(comm: MPI.Comm | None = None) -> int:
    return (comm or WORLD).Get_size()


def mpi_type(dtype: torch.dtype) -> MPI.Datatype:
    try:
        return _MPI_TYPES[dtype]
    except KeyError:
        raise TypeError(f"mpilm: no MPI transport for dtype {dtype}") from None


def buf(t: torch.Tensor) -> list:
    """Zero-copy ``[memory, count, datatype]`` for a contiguous tensor (CPU or CUDA).

    The caller must keep ``t`` alive until the MPI call (or request) using it completes.
    """
    if not t.is_contiguous():
        raise ValueError("mpilm: MPI buffers must be contiguous tensors")
    datatype = mpi_type(t.dtype)
    raw = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
    memory = raw if raw.is_cuda else raw.numpy()
    return [memory, t.numel(), datatype]


@dataclass
class Traffic:
    """Bytes this rank sent and received through mpilm's own point-to-point calls."""

    sent: int = 0
    received: int = 0

    def add(self, sent: int = 0, received: int = 0) -> None:
        self.sent += sent
        self.received += received

    def reset(self) -> None:
        self.sent = self.received = 0


traffic = Traffic()


# ---------------------------------------------------------------- node topology
@functools.lru_cache(maxsize=None)
def _node_comm_cached(comm_handle: int, fake_ranks_per_node: int) -> MPI.Comm:
    comm = MPI.Comm.f2py(comm_handle)
    if fake_ranks_per_node > 0:
        # testing aid: consecutive blocks of k ranks pretend to be one node
        return comm.Split(color=comm.Get_rank() // fake_ranks_per_node, key=comm.Get_rank())
    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


def fake_ranks_per_node() -> int:
    """``MPILM_RANKS_PER_NODE`` (a testing aid: fake nodes on one machine), 0 when unset."""
    value = os.environ.get("MPILM_RANKS_PER_NODE", "").strip()
    if not value:
        return 0
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"MPILM_RANKS_PER_NODE={value!r}: expected a whole number >= 1")
    return int(value)


def node_comm(comm: MPI.Comm | None = None) -> MPI.Comm:
    """The ranks of ``comm`` on this (real or fake) node. Collective on first call per comm."""
    comm = comm or WORLD
    return _node_comm_cached(comm.py2f(), fake_ranks_per_node())


def local_rank() -> int:
    return node_comm().Get_rank()


def local_size() -> int:
    return node_comm().Get_size()


def pick_device(choice: str) -> torch.device:
    """``auto`` -> ``cuda:<local rank>`` when CUDA is present, else CPU with cores split per rank.

    Raises UsageError on every rank alike (the check uses only per-node facts that are equal for
    ranks of the same node, and a node without a GPU fails the same way on all of them).
    """
    if choice not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {choice}: expected one of auto, cpu, cuda")
    has_cuda = torch.cuda.is_available()
    if choice == "cuda" and not has_cuda:
        raise UsageError("--device cuda: no CUDA GPU is visible to torch on this node (use --device cpu)")
    if choice in ("auto", "cuda") and has_cuda:
        device = torch.device("cuda", local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    torch.set_num_threads(placement().threads)
    return torch.device("cpu")


# ---------------------------------------------------------------- placement
def cpu_threads(my_cores: set[int], node_masks: list[set[int]], env: dict[str, str]) -> int:
    """Compute threads for one rank: ``OMP_NUM_THREADS``, else ``SLURM_CPUS_PER_TASK``, else the
    cores of its affinity mask shared out over the node's ranks whose masks overlap it (itself
    included). Not ``os.cpu_count()``: a rank bound to one core by taskset, cgroups or Slurm that
    starts one thread per machine core ran 16x slower. ValueError names a bad variable."""
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = env.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name}={value!r}: expected a whole number >= 1")
            return int(value)
    sharing = sum(1 for mask in node_masks if mask & my_cores) or 1
    return max(1, len(my_cores) // sharing)


@dataclass(frozen=True)
class Placement:
    """Where this rank runs: its node's name, the cores it may use, its compute threads."""

    node: str
    cores: tuple[int, ...]
    threads: int


@functools.lru_cache(maxsize=None)
def placement() -> Placement:
    """This rank's placement. Collective over the world on first call (every rank must call it).

    The masks are gathered over the node (cold path: pickle is fine); a bad thread variable on
    any rank becomes one UsageError on every rank.
    """
    mine = set(os.sched_getaffinity(0))
    masks = node_comm().allgather(mine)  # blocks on every rank of this node
    problem = None
    try:
        threads = cpu_threads(mine, masks, dict(os.environ))
    except ValueError as err:
        problem, threads = str(err), 1
    problems = WORLD.allgather(problem)  # blocks on every rank: the verdict must be shared
    bad = next((p for p in problems if p), None)
    if bad:
        raise UsageError(bad)
    return Placement(MPI.Get_processor_name(), tuple(sorted(mine)), threads)


def compact_cores(cores) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    cores, out, i = sorted(set(cores)), [], 0
    while i < len(cores):
        j = i
        while j + 1 < len(cores) and cores[j + 1] == cores[j] + 1:
            j += 1
        out.append(str(cores[i]) if i == j else f"{cores[i]}-{cores[j]}")
        i = j + 1
    return ",".join(out)


def node_lines(device: str) -> list[str]:
    """One banner line per node (on rank 0; [] elsewhere): name, ranks, cores, threads, device.

    Collective: the node leaders gather to rank 0 (cold path, pickle).
    """
    here = placement()
    node = node_comm()
    ranks = node.gather((WORLD.Get_rank(), here.cores, here.threads, device), root=0)  # blocks on node peers
    summary = None
    if node.Get_rank() == 0:
        cores = set().union(*(set(c) for _, c, _, _ in ranks))
        threads = sorted({t for _, _, t, _ in ranks})
        devices = sorted({d for _, _, _, d in ranks})
        summary = (min(r for r, *_ in ranks), f"node {here.node}: ranks {compact_cores(r for r, *_ in ranks)} | "
                   f"cores {compact_cores(cores)} | {'/'.join(map(str, threads))} thread(s) per rank | "
                   f"{', '.join(devices)}")
    every = WORLD.gather(summary, root=0)  # blocks on every rank
    if WORLD.Get_rank() != 0:
        return []
    return [line for _, line in sorted(s for s in every if s)]


@functools.lru_cache(maxsize=None)
def cuda_aware() -> bool:
    """True when the MPI library says it accepts CUDA device pointers.

    Asks ``MPIX_Query_cuda_support`` (Open MPI, MPICH >= 4 built with GPU support) through
    ctypes; ``MPILM_CUDA_AWARE=0/1`` overrides the answer for libraries that do not say.
    """
    forced = os.environ.get("MPILM_CUDA_AWARE")
    if forced in ("0", "1"):
        return forced == "1"
    if not torch.cuda.is_available():
        return False
    try:
        # dlsym through mpi4py's extension module also searches the libmpi it links against
        import mpi4py.MPI as mpi_module

        query = getattr(ctypes.CDLL(mpi_module.__file__), "MPIX_Query_cuda_support", None)
        return bool(query and query())
    except OSError:
        return False


def library_version() -> str:
    return MPI.Get_library_version().strip().splitlines()[0].strip()


# ---------------------------------------------------------------- error policy
def say(msg: str, *, all_ranks: bool = False) -> None:
    """Rank 0 speaks; other ranks only when ``all_ranks`` (then prefixed ``[rank r]``)."""
    r = WORLD.Get_rank()
    if r == 0:
        print(msg, flush=True)
    elif all_ranks:
        print(f"[rank {r}] {msg}", flush=True)


def run_main(fn, *args, **kwargs) -> int:
    """Run an entry point under the project's error policy and return its exit status.

    - UsageError raised collectively: rank 0 prints ``error: ...``, every rank exits 2.
    - UsageError with ``collective=False`` (only this rank knows): print it and abort with 2.
    - Any other exception: ``[rank r]`` traceback, then ``Abort(1)``: peers blocked in a
      collective are killed instead of waiting forever.
    """
    try:
        fn(*args, **kwargs)
        return 0
    except UsageError as err:
        if getattr(err, "collective", True):
            if WORLD.Get_rank() == 0:
                print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
        print(f"[rank {WORLD.Get_rank()}] error: {err}", file=sys.stderr, flush=True)
        WORLD.Abort(2)
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - anything unexpected must take the whole job down
        r = WORLD.Get_rank()
        text = "".join(traceback.format_exc())
        sys.stderr.write("".join(f"[rank {r}] {line}\n" for line in text.rstrip().splitlines()))
        sys.stderr.flush()
        WORLD.Abort(1)
    return 1  # not reached: Abort does not return
