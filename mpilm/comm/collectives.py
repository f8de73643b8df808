"""Allreduce and its two halves on flat 1-D torch tensors, in place; the algorithm dispatcher.

Public API (kept stable; grad sync, ZeRO-1 and the benchmarks call it):
    allreduce(buf, comm=None, algorithm="auto", op="avg") -> buf
    reduce_scatter(buf, comm=None, op="avg", algorithm="ring") -> this rank's reduced slice (a view)
    allgather(buf, comm=None, algorithm="ring") -> buf, every slice filled from its owner
        (the halves take ring, rhd, shm, hier, mpi or auto: ``REDUCE_SCATTER_ALGORITHMS``)
    shard_bounds(n, p, r) -> (start, stop) of rank r's slice: the one definition of ownership
    describe_auto(sizes_bytes, comm=None, dtype=torch.float32, device=None, halves=False) -> [(size, algorithm), ...]
    algorithm_that_runs(name, device, comm=None, halves=False) -> what ``allreduce(..., name)``
        (``halves``: the reduce-scatter / allgather) really runs, in words
    prepare(comm=None): the collective first-use set-up, done up front (before a comm thread starts)
    ALGORITHMS, REDUCE_SCATTER_ALGORITHMS: the names ``allreduce`` / the halves accept

Algorithms (each in its own module, all taking ``(buf, comm, op)``):
    ring  segmented, pipelined ring (``ring.py``): bandwidth-optimal, for large messages
    rhd   Rabenseifner halving/doubling (``rhd.py``): 2 lg p latency steps, medium/large messages
    tree  recursive doubling (``tree.py``): lg p steps of the whole vector, small messages
    shm   node shared-memory allreduce (``shm.py``), hier  node-aware two-level (``hier.py``)
    mpi   the MPI library's own ``MPI_Allreduce`` (``mpi.py``, the baseline)
    auto  per message size and world size, from the thresholds in ``tuning.py``

What runs is decided in one place, ``_runner`` (``algorithm_that_runs`` and ``describe_auto``
report from the same code): CUDA tensors with an MPI that is not CUDA-aware go through host
memory (``staging.py``: the staged ring for every name but ``mpi``, which runs the library on
host copies); with a CUDA-aware MPI, ``shm`` and ``hier`` (host memory only) run the ring.

Imports flow one way: this module imports every algorithm module and nothing imports it back
(see ``common.py`` for the graph).

Every rank must call with the same length, dtype, algorithm and op; ``auto`` chooses from those
replicated values only, so all ranks run the same algorithm. Any length (0 included), any world
size, dtypes float32, float64, float16 and bfloat16 (MPI never reduces the half types: they
travel as raw 16-bit words and are added by torch).

What it does not: no bucketing or overlap with backward (``grad_sync.py``), no compression.
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from mpilm.comm import common, hier, mpi, p2p, rhd, ring, shm, staging, tree, tuning, world
from mpilm.comm.common import ALGORITHMS, REDUCE_SCATTER_ALGORITHMS, shard_bounds  # noqa: F401 (public names)

STAGED_RING = "staged ring"  # runner names of the host-staged pipelines
STAGED_MPI = "staged mpi"

# runner name -> allreduce(buf, comm, op)
_RUN = {
    "ring": ring.allreduce,
    "rhd": rhd.allreduce,
    "tree": tree.allreduce,
    "shm": shm.allreduce,
    "hier": hier.allreduce,
    "mpi": mpi.allreduce,
    STAGED_RING: lambda buf, comm, op: staging.allreduce_staged(buf, comm, "ring", op),
    STAGED_MPI: lambda buf, comm, op: staging.allreduce_staged(buf, comm, "mpi", op),
}

# runner name -> reduce_scatter(buf, comm, op) -> this rank's shard_bounds slice (a view)
_REDUCE_SCATTER = {
    "ring": ring.reduce_scatter,
    "rhd": rhd.reduce_scatter,
    "shm": shm.reduce_scatter,
    "hier": hier.reduce_scatter,
    "mpi": mpi.reduce_scatter,
    STAGED_RING: lambda buf, comm, op: staging.reduce_scatter_staged(buf, comm, ring.reduce_scatter, op),
    STAGED_MPI: lambda buf, comm, op: staging.reduce_scatter_staged(buf, comm, mpi.reduce_scatter, op),
}

# runner name -> allgather(buf, comm) -> buf
_ALLGATHER = {
    "ring": ring.allgather,
    "rhd": rhd.allgather,
    "shm": shm.allgather,
    "hier": hier.allgather,
    "mpi": mpi.allgather,
    STAGED_RING: lambda buf, comm: staging.allgather_staged(buf, comm, ring.allgather),
    STAGED_MPI: lambda buf, comm: staging.allgather_staged(buf, comm, mpi.allgather),
}


def _route(algorithm: str, on_cuda: bool) -> str:
    """The runner for ``algorithm`` (``auto`` included, unresolved) on a call that moves data.

    Host buffers run what was asked; ``_runner`` takes that exit inline on its hot path."""
    if not on_cuda:
        return algorithm
    if not world.cuda_aware():
        return STAGED_MPI if staging.staged_algorithm(algorithm) == "mpi" else STAGED_RING
    if algorithm in common.HOST_ONLY:
        return "ring"  # no CUDA IPC: GPUs of a node meet through the ring
    return algorithm


def _runner(algorithm: str, nbytes: int, dtype: torch.dtype, on_cuda: bool, comm: MPI.Comm,
            tuning_file=None, halves: bool = False) -> str:
    """What ``allreduce`` (``halves``: ``reduce_scatter`` / ``allgather``) runs for a message of
    ``nbytes`` (> 0) on ``comm`` (> 1 rank): a key of ``_RUN`` (of ``_REDUCE_SCATTER`` and
    ``_ALLGATHER``). The one decision: the dispatch, ``describe_auto`` and ``algorithm_that_runs``
    use it. The halves differ only in how ``auto`` picks (``tuning.choose_halves``: a pick with
    no halves, ``tree``, becomes ``rhd`` or ``ring``); the routes of CUDA buffers are the same."""
    choose = tuning.choose_halves if halves else tuning.choose
    if not on_cuda:  # the hot path: host buffers run what was asked (auto: what it picks)
        return choose(nbytes, comm, dtype, tuning_file) if algorithm == "auto" else algorithm
    runner = _route(algorithm, True)
    if runner == "auto":
        runner = _route(choose(nbytes, comm, dtype, tuning_file), True)
    return runner


def allreduce(buf: torch.Tensor, comm: MPI.Comm | None = None, algorithm: str = "auto", op: str = "avg"):
    """Sum (``op="sum"``) or average (``op="avg"``) ``buf`` over ``comm`` in place; returns ``buf``."""
    comm = comm or world.WORLD
    common.check(buf, "allreduce", op, algorithm)
    p = comm.Get_size()
    if p == 1 or buf.numel() == 0:
        return common.finish(buf, p, op)
    return _RUN[_runner(algorithm, buf.nbytes, buf.dtype, buf.is_cuda, comm)](buf, comm, op)


def reduce_scatter(buf: torch.Tensor, comm: MPI.Comm | None = None, op: str = "avg",
                   algorithm: str = "ring") -> torch.Tensor:
    """Reduce ``buf`` so that this rank's ``shard_bounds`` slice holds the result; returns that view.

    The rest of ``buf`` is left holding partial sums or inputs (overwritten by a following
    ``allgather``). ``algorithm``: one of ``REDUCE_SCATTER_ALGORITHMS``: ``ring``, ``rhd``
    (recursive halving), ``shm`` (one node), ``hier`` (shm inside nodes + ring across), ``mpi``
    (``MPI_Reduce_scatter``) or ``auto`` (by the allreduce rules, ``tuning.choose_halves``).
    CUDA buffers take the same routes as ``allreduce`` (``_route``): with a CUDA-aware MPI,
    ring/rhd/mpi on device pointers and the ring for shm/hier; otherwise through host memory
    (``staging.reduce_scatter_staged``: the host ring, or the library's for ``mpi``).
    """
    comm = comm or world.WORLD
    common.check(buf, "reduce_scatter", op, algorithm, REDUCE_SCATTER_ALGORITHMS)
    p = comm.Get_size()
    if p == 1 or buf.numel() == 0:
        lo, hi = shard_bounds(buf.numel(), p, comm.Get_rank())
        return common.finish(buf[lo:hi], p, op)
    runner = _runner(algorithm, buf.nbytes, buf.dtype, buf.is_cuda, comm, halves=True)
    return _REDUCE_SCATTER[runner](buf, comm, op)


def allgather(buf: torch.Tensor, comm: MPI.Comm | None = None, algorithm: str = "ring") -> torch.Tensor:
    """Fill every rank's ``shard_bounds`` slice of ``buf`` from that rank, in place; returns ``buf``.

    ``algorithm`` and the routes of CUDA buffers as for ``reduce_scatter`` (``auto`` decides by the
    size of the whole buffer, so a reduce-scatter and the allgather after it pick alike).
    """
    comm = comm or world.WORLD
    common.check(buf, "allgather", "sum", algorithm, REDUCE_SCATTER_ALGORITHMS)
    if comm.Get_size() == 1 or buf.numel() == 0:
        return buf
    return _ALLGATHER[_runner(algorithm, buf.nbytes, buf.dtype, buf.is_cuda, comm, halves=True)](buf, comm)


def prepare(comm: MPI.Comm | None = None, tuning_file=None) -> None:
    """Do every collective first-use set-up on ``comm`` now: call on all ranks, from the main thread.

    The algorithms (``mpi`` and the host staging included) create a private duplicate of
    ``comm`` and ``auto`` loads its tuning table on first use; both are collective over ``comm``.
    A trainer that later calls ``allreduce`` from a communication thread calls this first, so
    that set-up never races its main thread's own collectives on the same communicator.
    """
    comm = comm or world.WORLD
    p2p.group(comm)
    if comm.Get_size() > 1:
        tuning.rules(comm, torch.float32, tuning_file)


def describe_auto(sizes_bytes, comm: MPI.Comm | None = None, dtype: torch.dtype = torch.float32,
                  tuning_file=None, device=None, halves: bool = False) -> list[tuple[int, str]]:
    """What ``algorithm="auto"`` runs for each message size (bytes) of ``dtype`` on ``comm``.

    Returns ``[(size_bytes, algorithm), ...]``; ``"none"`` where nothing moves (one rank, or an
    empty message). With ``device`` (of the buffers), the names say what really runs there:
    ``"ring"`` where ``auto`` picks ``shm`` for CUDA buffers, ``"staged ring"`` (or ``"staged
    mpi"``) when MPI is not CUDA-aware. ``halves``: what ``reduce_scatter`` / ``allgather`` with
    ``auto`` run instead (never ``tree``). Collective on first use per communicator (it loads and
    broadcasts the tuning table), so call it on every rank.
    """
    comm = comm or world.WORLD
    if comm.Get_size() == 1:
        return [(int(s), "none") for s in sizes_bytes]
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return [(int(s), _runner("auto", int(s), dtype, on_cuda, comm, tuning_file, halves) if s > 0 else "none")
            for s in sizes_bytes]


_NOT_CUDA_AWARE = "staged through host memory: MPI is not CUDA-aware"


def algorithm_that_runs(name: str, device, comm: MPI.Comm | None = None, halves: bool = False) -> str:
    """What ``allreduce(buf, comm, name)`` really runs for non-empty buffers on ``device``, in words.

    ``"ring"``, ``"shm"``... when the name runs as asked; ``"ring (shm has no GPU path: CUDA
    buffers take the ring)"``; ``"ring (staged through host memory: MPI is not CUDA-aware)"``
    (plus ``"; rhd has no staged variant"`` for names other than ring and auto); ``"mpi (staged
    through host memory: ...)"``; ``"none (one rank: nothing to exchange)"``. ``"auto"`` stays
    ``"auto"`` where it chooses per message size: ``describe_auto(sizes, comm, device=device)``
    says what it picks. Decided by the dispatcher's own code (``_route``); not collective.
    ``halves``: the same for ``reduce_scatter`` / ``allgather`` (names from
    ``REDUCE_SCATTER_ALGORITHMS``; the routes are the same).
    """
    choices = REDUCE_SCATTER_ALGORITHMS if halves else ALGORITHMS
    if name not in choices:
        raise ValueError(f"algorithm_that_runs: algorithm {name!r}: expected one of {', '.join(choices)}")
    comm = comm or world.WORLD
    if comm.Get_size() == 1:
        return "none (one rank: nothing to exchange)"
    runner = _route(name, torch.device(device).type == "cuda")
    if runner == STAGED_MPI:
        return f"mpi ({_NOT_CUDA_AWARE})"
    if runner == STAGED_RING:
        return f"ring ({_NOT_CUDA_AWARE})" if name in ("ring", "auto") else \
            f"ring ({_NOT_CUDA_AWARE}; {name} has no staged variant)"
    if runner != name:
        return f"{runner} ({name} has no GPU path: CUDA buffers take the {runner})"
    return runner
