"""MPI start-up and the border between torch tensors and MPI buffers.

What it does:
- ``rank()``, ``size()``, ``node_comm()`` / ``local_rank()`` (ranks sharing a node, from
  ``COMM_TYPE_SHARED``; ``MPILM_RANKS_PER_NODE=k`` splits the world into fake nodes of k ranks
  so node-aware code can be tested on one machine), ``pick_device()``.
- ``buf(t)``: a zero-copy mpi4py buffer spec ``[memory, count, datatype]`` for a contiguous
  tensor (CPU via numpy, CUDA via ``__cuda_array_interface__``; bfloat16 travels as raw 16-bit
  words because MPI has no bf16 type, so never let MPI *reduce* a bf16 buffer).
- ``place(choice)`` / ``pick_device(choice)``: this rank's device and torch compute threads, set
  and returned as a ``Placement`` (node name, cores = its affinity mask, threads, device); threads
  are ``OMP_NUM_THREADS``, else ``SLURM_CPUS_PER_TASK``, else the mask shared out over the
  machine's ranks whose masks overlap it (``cpu_threads``, pure). ``node_lines()``: the banner's
  one line per node (``describe_node``, pure).
- ``cuda_aware()``: whether the MPI library can take device pointers (``library_cuda_support()``:
  the library's own answer). ``library_version()`` / ``mpi_description()``: the library in one
  line, and the banner's ``library | thread level | CUDA-aware`` line.
- ``traffic``: bytes this rank handed to / received from point-to-point calls, and read from /
  written into its node peers' shared memory, so compression ratios are measured rather than
  computed; thread-safe (a communication thread and the main thread both count).
- ``require_thread_level(needed, why)``: a ``UsageError`` saying what to do when MPI was started
  with a lower thread level than a feature (a communication thread) needs.
- ``run_main(fn)``: the error policy of every entry point: ``UsageError`` -> ``error: ...`` and
  exit 2; any other exception -> ``[rank r]`` traceback and ``MPI.COMM_WORLD.Abort`` so the job
  never hangs on a dead rank.
- ``launch_problem()``: a launcher (``srun``, ``mpiexec``, PBS) that started N processes which MPI
  sees as N separate 1-rank jobs; ``run_main`` stops them with ``error: ...``, exit 2 on each.

What it does not: no collectives (``collectives.py``), no knowledge of models or data; it does
not bind ranks to cores (the launcher, taskset, cgroups or Slurm do), it only reads the masks.

Limits: ``place`` and ``node_lines`` use pickle-based MPI calls (start-up only). Where the OS has
no affinity masks every rank counts every core of its machine. ``OMP_NUM_THREADS`` must be one
whole number (OpenMP's per-level lists such as ``4,2`` are refused).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import socket
import sys
import threading
import time
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


def bcast_(t: torch.Tensor, comm: MPI.Comm, root: int) -> None:
    """Make contiguous ``t`` equal to ``root``'s, in place (through host memory when MPI cannot read
    device memory). SYNC: blocks until ``root`` sends."""
    staged = t.cpu() if t.is_cuda and not cuda_aware() else t
    comm.Bcast(buf(staged), root=root)
    if staged is not t:
        t.copy_(staged)


class Traffic:
    """Bytes this rank moved through mpilm's collectives; safe to update from several threads.

    ``sent`` / ``received``: bytes handed to / received from MPI point-to-point calls (estimated
    for the MPI library's own collectives). ``shm_read`` / ``shm_written``: bytes this rank read
    from / wrote into its node peers' shared memory (``shm``, and ``hier`` inside a node), which
    MPI never sees; copies into this rank's own shared segment are not counted. A communication
    thread and the main thread may both add: every update holds a lock, so no count is lost
    (``snapshot()`` reads all four at one instant).
    """

    FIELDS = ("sent", "received", "shm_read", "shm_written")

    __slots__ = ("_lock", "_sent", "_received", "_shm_read", "_shm_written")

    def __init__(self):
        self._lock = threading.Lock()
        self._sent = self._received = self._shm_read = self._shm_written = 0

    def add(self, sent: int = 0, received: int = 0, shm_read: int = 0, shm_written: int = 0) -> None:
        with self._lock:
            self._sent += sent
            self._received += received
            self._shm_read += shm_read
            self._shm_written += shm_written

    def reset(self) -> None:
        with self._lock:
            self._sent = self._received = self._shm_read = self._shm_written = 0

    def snapshot(self) -> dict[str, int]:
        """All four counters, read together."""
        with self._lock:
            return {"sent": self._sent, "received": self._received,
                    "shm_read": self._shm_read, "shm_written": self._shm_written}

    @property
    def sent(self) -> int:
        return self._sent

    @property
    def received(self) -> int:
        return self._received

    @property
    def shm_read(self) -> int:
        return self._shm_read

    @property
    def shm_written(self) -> int:
        return self._shm_written

    def __repr__(self) -> str:
        return "Traffic(" + ", ".join(f"{k}={v}" for k, v in self.snapshot().items()) + ")"


traffic = Traffic()


# ---------------------------------------------------------------- thread level
THREAD_LEVELS = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
                 MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}


def thread_level_name(level: int) -> str:
    return THREAD_LEVELS.get(level, f"unknown ({level})")


def require_thread_level(needed: int, why: str) -> None:
    """UsageError unless MPI was started with at least thread level ``needed`` (``MPI.THREAD_*``).

    ``why`` says what needs it (e.g. "--overlap: a communication thread calls the collectives
    while the main thread runs MPI calls of its own"). The level is a property of the process,
    the same on every rank of a normal launch, so the error is raised collectively.
    """
    granted = MPI.Query_thread()
    if granted >= needed:
        return
    wanted = thread_level_name(needed)
    raise UsageError(
        f"MPI granted thread level '{thread_level_name(granted)}', but {why} needs '{wanted}': "
        f"set MPI4PY_RC_THREAD_LEVEL={wanted} (or leave it unset: mpi4py asks for 'multiple'), "
        f"and use an MPI library built with thread support (this one: {library_version()})")


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
    """``auto`` -> ``cuda:<local rank>`` when CUDA is present, else CPU; sets torch's threads.

    The device and threads come from ``place(choice)``: collective over the world, and a
    UsageError is raised on every rank alike.
    """
    return torch.device(place(choice).device)


# ---------------------------------------------------------------- placement
THREAD_VARIABLES = ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")  # first one set wins


def cpu_threads(my_cores: set[int], node_masks: list[set[int]], env) -> int:
    """Compute threads for one rank (pure: no MPI, no torch).

    ``OMP_NUM_THREADS``, else ``SLURM_CPUS_PER_TASK``, else the cores of this rank's affinity
    mask shared out over the ranks of its machine whose masks overlap it (``node_masks``, itself
    included): ``max(1, len(mine) // overlapping)``. Not ``os.cpu_count()``: a rank bound to one
    core by taskset, cgroups or Slurm that starts one thread per machine core ran 16x slower.
    A set variable that is not a whole number >= 1 raises a UsageError naming it, marked
    ``collective=False`` (the environment is per rank: ``place`` shares the verdict).
    """
    for name in THREAD_VARIABLES:
        value = env.get(name, "").strip()
        if value:
            if not (value.isascii() and value.isdigit()) or int(value) < 1:
                raise UsageError(f"{name}={value!r}: expected a whole number >= 1", collective=False)
            return int(value)
    sharing = sum(1 for mask in node_masks if mask & my_cores) or 1
    return max(1, len(my_cores) // sharing)


@dataclass(frozen=True)
class Placement:
    """Where this rank runs: its node's name, the cores it may use, torch's compute threads as
    set, and its device (``cpu``, ``cuda:0``...)."""

    node: str
    cores: tuple[int, ...]
    threads: int
    device: str


def affinity() -> set[int]:
    """The cores this process may run on (its affinity mask); every core where the OS has no masks."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return set(range(os.cpu_count() or 1))


def node_name() -> str:
    return MPI.Get_processor_name() or socket.gethostname()


def _machine_comm() -> MPI.Comm:
    """The ranks of the world on this machine (shared memory), ignoring fake nodes: ranks of two
    fake nodes on one machine still compete for its cores."""
    return _node_comm_cached(WORLD.py2f(), 0)


_placed: Placement | None = None
_world_nodes: list[str] = []  # every world rank's node name, gathered by place()


def place(choice: str) -> Placement:
    """Choose this rank's device and compute threads, set them, and return the record.

    Collective over the world (cold path: pickle-based calls are fine): the affinity masks are
    gathered over the machine's ranks, then every rank's verdict on its own environment (thread
    variables, a GPU for ``--device cuda``) over the world, so a problem on any rank becomes the
    same UsageError on every rank instead of a hang. CUDA ranks get threads by the same rule
    (the host side of a step, data and the comm thread still run on the CPU).
    """
    global _placed
    if choice not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {choice}: expected one of auto, cpu, cuda")
    has_cuda = torch.cuda.is_available()
    mine = affinity()
    masks = _machine_comm().allgather(mine)  # blocks on every rank of this machine
    problem, threads = None, 1
    try:
        threads = cpu_threads(mine, masks, os.environ)
    except UsageError as err:
        problem = str(err)
    if problem is None and choice == "cuda" and not has_cuda:
        problem = f"--device cuda: no CUDA GPU is visible to torch on {node_name()} (use --device cpu)"
    global _world_nodes
    verdicts = WORLD.allgather((problem, node_name()))  # blocks on every rank: one verdict for the whole job
    problems, _world_nodes = [p for p, _ in verdicts], [n for _, n in verdicts]
    bad = [(r, p) for r, p in enumerate(problems) if p]
    if bad:
        where = "" if len(bad) == len(problems) and len({p for _, p in bad}) == 1 else f" (on rank {bad[0][0]})"
        raise UsageError(bad[0][1] + where)
    if choice in ("auto", "cuda") and has_cuda:
        device = torch.device("cuda", local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.set_num_threads(threads)
    _placed = Placement(node_name(), tuple(sorted(mine)), torch.get_num_threads(), str(device))
    return _placed


def placement() -> Placement:
    """The record the last ``place()`` (or ``pick_device()``) made on this rank."""
    if _placed is None:
        raise RuntimeError("mpilm: placement() before place() / pick_device()")
    return _placed


def node_of(rank: int) -> str | None:
    """The node world rank ``rank`` runs on, as gathered by ``place()``; None before it ran."""
    return _world_nodes[rank] if 0 <= rank < len(_world_nodes) else None


def compact_cores(cores) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (taskset's list syntax); also for rank lists."""
    cores, out, i = sorted(set(cores)), [], 0
    while i < len(cores):
        j = i
        while j + 1 < len(cores) and cores[j + 1] == cores[j] + 1:
            j += 1
        out.append(str(cores[i]) if i == j else f"{cores[i]}-{cores[j]}")
        i = j + 1
    return ",".join(out)


def describe_node(members: list[tuple[int, Placement]]) -> str:
    """One banner line for the ranks of one node, from ``(world rank, placement)`` pairs (pure).

    ``node n0: ranks 0-1 | cores 0-3 | 2 thread(s) per rank | cpu``: cores are the union of the
    ranks' masks; threads and devices that differ between ranks are listed in rank order.
    """
    members = sorted(members, key=lambda m: m[0])
    threads = [p.threads for _, p in members]
    devices = [p.device for _, p in members]
    cores = set().union(*(p.cores for _, p in members))
    return (f"node {members[0][1].node}: ranks {compact_cores(r for r, _ in members)} | "
            f"cores {compact_cores(cores)} | "
            f"{threads[0] if len(set(threads)) == 1 else '/'.join(map(str, threads))} thread(s) per rank | "
            f"{devices[0] if len(set(devices)) == 1 else ', '.join(devices)}")


def node_lines() -> list[str]:
    """The banner's line per node (``describe_node``) on rank 0, in rank order; [] elsewhere.

    Collective over the world, after ``place()``: each node's ranks gather their placements at
    the node's leader, the leaders' lines go to rank 0 (cold path, pickle).
    """
    node = node_comm()
    members = node.gather((WORLD.Get_rank(), placement()), root=0)  # blocks on every rank of this node
    line = (min(r for r, _ in members), describe_node(members)) if node.Get_rank() == 0 else None
    lines = WORLD.gather(line, root=0)  # blocks on every rank: the leaders' lines reach rank 0
    if WORLD.Get_rank() != 0:
        return []
    return [text for _, text in sorted(entry for entry in lines if entry)]


_BASE_NICE: dict[int, int] = {}  # thread id -> its nice value before prioritize_this_thread touched it


def prioritize_this_thread(levels: int) -> str:
    """Run the calling thread ``levels`` nice levels ahead of the process's main thread.

    For a communication thread that shares its cores with computation: when it wakes to move the
    next segment, the scheduler should run it at once rather than after the computing thread's
    time slice (on a core shared with backward, a thread at equal priority stretched a bucket's
    transfer about 2.5x). First it tries to raise this thread's own priority (nice -levels: root,
    or an ``ulimit -e`` that allows it), which leaves every other thread as it was; if that is not
    permitted it lowers the main thread instead (nice +levels, allowed to anyone; threads the main
    thread creates later inherit it, those it created before keep theirs). Idempotent: the target
    is relative to the nice values first seen. Returns what it did, for the banner.
    """
    if levels <= 0:
        return "communication thread at the same priority as compute (--comm-priority 0)"
    me = threading.get_native_id()
    base = _BASE_NICE.setdefault(me, os.getpriority(os.PRIO_PROCESS, me))
    try:
        os.setpriority(os.PRIO_PROCESS, me, max(-20, base - levels))
        return f"communication thread raised to nice {max(-20, base - levels)}"
    except PermissionError:
        main = threading.main_thread().native_id
        main_base = _BASE_NICE.setdefault(main, os.getpriority(os.PRIO_PROCESS, main))
        os.setpriority(os.PRIO_PROCESS, main, min(19, main_base + levels))
        return (f"main (compute) thread lowered to nice {min(19, main_base + levels)} "
                "(raising the communication thread is not permitted here)")


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
    return bool(library_cuda_support())


@functools.lru_cache(maxsize=None)
def library_cuda_support() -> bool | None:
    """The MPI library's own answer to ``MPIX_Query_cuda_support()`` (whether it was built to take
    CUDA device pointers; asked whether or not a GPU is present), None when it has no such call."""
    try:
        # dlsym through mpi4py's extension module also searches the libmpi it links against
        import mpi4py.MPI as mpi_module

        query = getattr(ctypes.CDLL(mpi_module.__file__), "MPIX_Query_cuda_support", None)
    except OSError:
        return None
    return None if query is None else bool(query())


def library_version() -> str:
    """The MPI library that runs, in one short line: ``MPICH 5.0.2``, ``Open MPI v4.1.4``,
    ``Intel(R) MPI Library 2021.6 for Linux* OS``... (the first line of ``MPI_Get_library_version``,
    read at run time, so an ABI-compatible library swapped in under mpi4py is named as itself;
    spaces collapsed, ``Version:`` labels and Open MPI's ``, package: ...`` details dropped)."""
    first = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
    return re.sub(r"\s*\bversion\s*:\s*", " ", first.split(", ")[0], flags=re.IGNORECASE).strip()


def mpi_description() -> str:
    """The banner's account of MPI: library and version, the thread level granted, and whether
    the collectives may hand it CUDA device pointers, e.g. ``Open MPI v4.1.4 | thread level
    multiple | CUDA-aware: no``. Not collective."""
    forced = os.environ.get("MPILM_CUDA_AWARE")
    library = library_cuda_support()
    if forced in ("0", "1"):
        aware = f"{'yes' if forced == '1' else 'no'} (MPILM_CUDA_AWARE={forced})"
    elif library is None:
        aware = "unknown, taken as no (no MPIX_Query_cuda_support; MPILM_CUDA_AWARE=1 overrides)"
    else:
        aware = "yes" if library else "no"
    return f"{library_version()} | thread level {thread_level_name(MPI.Query_thread())} | CUDA-aware: {aware}"


# ---------------------------------------------------------------- launch sanity
def _task_count(env, *names: str) -> int | None:
    for name in names:
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def launch_problem(env=None, world_size: int | None = None, library: str | None = None) -> str | None:
    """Why this launch is wrong, as one line for ``error: ...``, or None when it is fine.

    Does: catch a launcher that started N > 1 processes which MPI sees as N separate jobs of one
    rank (world size 1), so the run would train N times, unaware: a plain ``srun -n N`` (no PMI
    for MPI to join), ``srun --mpi=TYPE`` with a TYPE this MPI library does not speak, or the
    ``mpiexec`` / ``mpirun`` of another MPI than the one mpi4py runs. Read from ``env`` (default
    ``os.environ``), the innermost launcher first: Open MPI's ``OMPI_COMM_WORLD_SIZE``; PMI's
    ``PMI_SIZE`` (Hydra, Intel MPI, ``srun --mpi=pmi2``), where a size of 1 settles it (an MPI
    launcher started this one rank, e.g. Hydra's proxy inside a Slurm step); inside an srun step
    (``SLURM_STEP_ID`` set) ``SLURM_STEP_NUM_TASKS`` / ``SLURM_NTASKS`` / ``SLURM_NPROCS``, with
    ``SLURM_MPI_TYPE`` for the wording. Inside a PBS job (``PBS_JOBID``) the advice names its node
    file. ``world_size`` and ``library`` default to MPI's own answers.

    Does not: object to a world larger than 1, or to one process in a batch script: ``sbatch``
    and ``salloc`` set ``SLURM_NTASKS`` but no ``SLURM_STEP_ID`` there, and PBS starts only the
    script. Limits: ``pbsdsh`` gives its tasks nothing that tells them from the batch script, so N
    copies it started are not caught; one process in an interactive many-task step
    (``srun -n 4 --pty bash``) is refused like a plain ``srun -n 4`` (use ``salloc``).
    """
    env = os.environ if env is None else env
    if (WORLD.Get_size() if world_size is None else world_size) > 1:
        return None
    library = library or library_version()
    ompi = _task_count(env, "OMPI_COMM_WORLD_SIZE")
    if ompi is not None:
        return None if ompi <= 1 else (
            f"Open MPI's mpirun started {ompi} separate 1-rank jobs: mpi4py runs {library}, not Open MPI; "
            f"launch with {library}'s own mpiexec, or build mpi4py against Open MPI (make install MPICH=)")
    pmi = _task_count(env, "PMI_SIZE")
    if pmi is not None and pmi <= 1:
        return None
    if "SLURM_STEP_ID" in env or "SLURM_STEPID" in env:
        tasks = _task_count(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS") or pmi or 1
        mpi_type = env.get("SLURM_MPI_TYPE", "none").strip() or "none"
        if tasks > 1 and mpi_type == "none":
            return f"srun started {tasks} separate 1-rank jobs; launch with srun --mpi=pmi2 (or pmix), or mpiexec"
        if tasks > 1:
            return (f"srun --mpi={mpi_type} started {tasks} separate 1-rank jobs: {library} did not join srun's "
                    f"{mpi_type}; launch with another --mpi type (srun --mpi=list; pmi2 or pmix), or mpiexec")
    if pmi is not None:
        where = f" in PBS job {env['PBS_JOBID']}" if "PBS_JOBID" in env else ""
        nodes = " -f $PBS_NODEFILE" if where else ""
        venv_mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        venv = f" (this Python's: {venv_mpiexec})" if os.access(venv_mpiexec, os.X_OK) else ""
        return (f"mpiexec started {pmi} separate 1-rank jobs{where}: its process manager is not that of {library}, "
                f"the MPI mpi4py runs; launch with that library's own mpiexec{nodes}{venv}")
    return None


# ---------------------------------------------------------------- error policy
def say(msg: str, *, all_ranks: bool = False) -> None:
    """Rank 0 speaks; other ranks only when ``all_ranks`` (then prefixed ``[rank r]``)."""
    r = WORLD.Get_rank()
    if r == 0:
        print(msg, flush=True)
    elif all_ranks:
        print(f"[rank {r}] {msg}", flush=True)


PROBE_TAG, ANSWER_TAG = 32_001, 32_002  # the watchdog's liveness probes on the world (MPI's tag bound is >= 32767)


class Watchdog:
    """Aborts the job when a wait on peers outlasts its timeout, naming what it waited for and who is silent.

    Does: ``with watchdog(timeout).waiting("the allreduce of bucket 3 ..."):`` around a wait
    registers it (per thread); one daemon thread per process checks the registry every
    ``min(1, timeout/4)`` s. A wait older than its timeout makes this rank ask every other rank
    "are you alive, and what are you waiting for?" (non-blocking point-to-point messages on the
    world, tags ``PROBE_TAG``/``ANSWER_TAG``, never waited on), wait ``grace_s`` for the answers,
    print one ``[rank r] error: stalled ...`` line naming the silent ranks and their nodes (a
    stopped or dead process, or one cut off by a dead link, cannot answer: its own watchdog
    thread is stopped too, or its messages do not arrive) plus one line with what the others
    wait for, and call ``Abort(3)``, which the launcher turns into the end of the whole job. Every
    rank's thread answers probes for the whole life of the process, busy or not.

    Does not: decide what counts as a wait (the callers register them); retry; tell a slow peer
    from a stopped one (a peer that answers is alive, whatever it waits for).

    Limits: the probes need MPI_THREAD_MULTIPLE (mpi4py's default); at a lower level the line
    names only this rank's own wait. Cheap when nothing stalls: one dict update per wait, one
    ``Iprobe`` per period.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._waits: dict[int, tuple[str, float, float]] = {}  # thread id -> (what, since, timeout)
        self._period = 1.0
        self._probing = MPI.Query_thread() == MPI.THREAD_MULTIPLE and WORLD.Get_size() > 1
        self._sends: list[MPI.Request] = []  # answers in flight; completed ones are dropped
        self._thread = threading.Thread(target=self._watch, name="mpilm-watchdog", daemon=True)
        self._thread.start()

    def timed(self, timeout_s: float) -> "TimedWatchdog":
        with self._lock:
            self._period = min(self._period, timeout_s / 4)
        return TimedWatchdog(self, timeout_s)

    def _watch(self) -> None:
        while True:
            time.sleep(self._period)
            self._answer_probes()
            now = time.monotonic()
            with self._lock:
                stalled = [(what, now - since, limit) for what, since, limit in self._waits.values() if now - since > limit]
            if stalled:
                self._abort(*stalled[0])

    def _doing(self) -> str:
        """What this rank is waiting for, for a peer's probe."""
        now = time.monotonic()
        with self._lock:
            waits = sorted(self._waits.values(), key=lambda w: w[1])
        if not waits:
            return "is not waiting on a peer"
        what, since, _ = waits[0]
        return f"waits {now - since:.0f} s for {what}"

    def _answer_probes(self) -> None:
        if not self._probing:
            return
        status = MPI.Status()
        while WORLD.iprobe(source=MPI.ANY_SOURCE, tag=PROBE_TAG, status=status):
            source = status.Get_source()
            WORLD.recv(source=source, tag=PROBE_TAG)
            self._sends.append(WORLD.isend(self._doing(), dest=source, tag=ANSWER_TAG))  # never waited on
        self._sends = [req for req in self._sends if not req.Test()]

    def _ask_peers(self, grace_s: float) -> tuple[dict[int, str], list[int]]:
        """Probe every other rank; (answers by rank, silent ranks) after at most ``grace_s``."""
        me, n = WORLD.Get_rank(), WORLD.Get_size()
        peers = [r for r in range(n) if r != me]
        probes = [WORLD.isend(None, dest=r, tag=PROBE_TAG) for r in peers]  # never waited on: a peer may be gone
        answers: dict[int, str] = {}
        status, deadline = MPI.Status(), time.monotonic() + grace_s
        while len(answers) < len(peers) and time.monotonic() < deadline:
            self._answer_probes()  # the peers may be probing at the same time
            while WORLD.iprobe(source=MPI.ANY_SOURCE, tag=ANSWER_TAG, status=status):
                answers[status.Get_source()] = WORLD.recv(source=status.Get_source(), tag=ANSWER_TAG)
            time.sleep(0.05)
        del probes
        return answers, [r for r in peers if r not in answers]

    def _abort(self, what: str, elapsed: float, limit: float) -> None:
        me = WORLD.Get_rank()
        head = (f"[rank {me}] error: stalled for {elapsed:.0f} s waiting for {what} (--comm-timeout {limit:g})")
        detail = ""
        if self._probing:
            grace = max(3.0, 3 * self._period)
            answers, silent = self._ask_peers(grace)
            if silent:
                head += (f": no answer within {grace:.0f} s from {_ranks_on_nodes(silent)}: stopped, dead, or cut off "
                         "from this rank by the network; aborting the job")
            else:
                head += ": every peer answered, so none is stopped: a lost message or mismatched calls; aborting the job"
            detail = "".join(f"[rank {me}]   rank {r} {text}\n" for r, text in sorted(answers.items()))
        else:
            head += ": a peer stopped, or the network is down; aborting the job"
        sys.stderr.write(head + "\n" + detail)
        sys.stderr.flush()
        time.sleep(0.5)  # let the launcher forward the lines before the job is torn down
        abort_job(3)


class TimedWatchdog:
    """The process's watchdog with one timeout: ``waiting(what)`` registers a wait (a context manager)."""

    __slots__ = ("dog", "timeout_s")

    def __init__(self, dog: Watchdog, timeout_s: float):
        self.dog, self.timeout_s = dog, timeout_s

    def waiting(self, what: str):
        return _Waiting(self.dog, what, self.timeout_s)


def _ranks_on_nodes(ranks: list[int]) -> str:
    """``rank 2 (node n1)`` / ``ranks 2-3 (node n1)``: ranks grouped by the node ``place()`` saw them on."""
    by_node: dict[str | None, list[int]] = {}
    for r in ranks:
        by_node.setdefault(node_of(r), []).append(r)
    parts = [f"rank{'s' if len(rs) > 1 else ''} {compact_cores(rs)}" + (f" (node {node})" if node else "")
             for node, rs in by_node.items()]
    return ", ".join(parts)


@functools.lru_cache(maxsize=None)
def _the_watchdog() -> Watchdog:
    return Watchdog()


def watchdog(timeout_s: float) -> TimedWatchdog:
    """The process's watchdog (one thread, however many Runs and timeouts) for waits of ``timeout_s``."""
    return _the_watchdog().timed(timeout_s)


class _Waiting:
    __slots__ = ("dog", "what", "timeout_s")

    def __init__(self, dog: Watchdog, what: str, timeout_s: float):
        self.dog, self.what, self.timeout_s = dog, what, timeout_s

    def __enter__(self):
        with self.dog._lock:
            self.dog._waits[threading.get_ident()] = (self.what, time.monotonic(), self.timeout_s)

    def __exit__(self, *exc):
        with self.dog._lock:
            self.dog._waits.pop(threading.get_ident(), None)


def abort_job(code: int) -> None:
    """End the whole job: ``MPI_Abort``, then this process in any case.

    ``MPI_Abort`` asks the launcher to kill every rank; when the launcher cannot act (its node
    stopped, or cut off by a dead link) it returns and the rank would live on (seen with the
    chaos bench: a rank re-probing its peers forever), so the process exits by itself, which the
    launcher's other proxies see as a dead rank once they can.
    """
    WORLD.Abort(code)
    os._exit(code)


def run_main(fn, *args, **kwargs) -> int:
    """Run an entry point under the project's error policy and return its exit status.

    - First ``launch_problem()``: N processes that should have been one job -> ``error: ...``
      from each, every one exits 2.
    - UsageError raised collectively: rank 0 prints ``error: ...``, every rank exits 2.
    - UsageError with ``collective=False`` (only this rank knows): print it and abort with 2.
    - Any other exception: ``[rank r]`` traceback, then ``Abort(1)``: peers blocked in a
      collective are killed instead of waiting forever.
    """
    try:
        problem = launch_problem()  # N processes that MPI sees as N 1-rank jobs: stop before any work
        if problem:
            raise UsageError(problem)
        fn(*args, **kwargs)
        return 0
    except UsageError as err:
        if getattr(err, "collective", True):
            if WORLD.Get_rank() == 0:
                print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
        print(f"[rank {WORLD.Get_rank()}] error: {err}", file=sys.stderr, flush=True)
        abort_job(2)
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - anything unexpected must take the whole job down
        r = WORLD.Get_rank()
        text = "".join(traceback.format_exc())
        sys.stderr.write("".join(f"[rank {r}] {line}\n" for line in text.rstrip().splitlines()))
        sys.stderr.flush()
        # Abort makes the launcher kill every process at once; its output forwarding can lose
        # what is still in the pipe (seen: a traceback missing 1 run in 3), so give it a moment
        time.sleep(0.5)
        abort_job(1)
    return 1  # not reached: abort_job does not return
