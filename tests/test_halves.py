"""The two halves of an allreduce (ZeRO-1's collectives) with every algorithm that has them.

``collectives.reduce_scatter`` leaves the reduced ``shard_bounds(n, p, r)`` slice on rank r and
``collectives.allgather`` fills every rank's slice from its owner, for ``ring``, ``rhd``, ``shm``,
``hier``, ``mpi`` and ``auto``, any length (0 included), any world size (the Makefile runs the
``collectives`` tests at -np 1, 4 and 5). Checked against a float64 reference built from every
rank's input (each rank regenerates them from seeds), plus the traffic counters, fake nodes
(``MPILM_RANKS_PER_NODE``) for ``hier``/``shm``, the ``auto`` decision and the staged (host
memory) halves run with the host standing in for the device. Nothing here checks speed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from mpi4py import MPI

from conftest import REDUCE_DTYPES as DTYPES
from conftest import REDUCE_TOLERANCE as TOLERANCE
from conftest import isolated_collective_settings
from mpilm.comm import collectives, mpi, ring, staging, tuning, world
from mpilm.comm.common import REDUCE_SCATTER_ALGORITHMS, shard_bounds

COMM = MPI.COMM_WORLD
P, RANK = COMM.Get_size(), COMM.Get_rank()
HALVES = REDUCE_SCATTER_ALGORITHMS
mpi_collective = [pytest.mark.mpi(min_size=1), pytest.mark.collectives]


def lengths(p: int) -> list[int]:
    return sorted({0, 1, max(p - 1, 0), 7, 1000, 100003})


def _input(n: int, dtype: torch.dtype, seed: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(n, generator=generator, dtype=torch.float64).to(dtype)


def _reference(n: int, dtype: torch.dtype, seed: int, op: str) -> np.ndarray:
    total = sum(_input(n, dtype, seed, q).double().numpy() for q in range(P))
    return total / P if op == "avg" else total


def _fake_nodes(monkeypatch, ranks_per_node: int | None) -> None:
    """Set the fake node size (every rank alike) and drop ``auto``'s rules cached per
    communicator: they were chosen for the node layout of their first use. Fake nodes of several
    ranks need one real node (their shared windows cannot span the emulated cluster's nodes)."""
    if ranks_per_node is not None and ranks_per_node > 1 and os.environ.get("MPILM_RANKS_PER_NODE") is None \
            and world.node_comm(COMM).Get_size() != P:
        pytest.skip("fake nodes of several ranks need all ranks on one real node")
    if ranks_per_node is None:
        monkeypatch.delenv("MPILM_RANKS_PER_NODE", raising=False)
    else:
        monkeypatch.setenv("MPILM_RANKS_PER_NODE", str(ranks_per_node))
    tuning.forget()


def _one_node() -> bool:
    return world.node_comm(COMM).Get_size() == P


def _moved() -> int:
    t = world.traffic
    return t.sent + t.received + t.shm_read + t.shm_written


isolated_settings = pytest.fixture(autouse=True, scope="module")(isolated_collective_settings)


def _check_halves(algorithm: str, dtype: torch.dtype, op: str = "avg", seed: int = 1) -> None:
    rtol, atol = TOLERANCE[dtype]
    for n in lengths(P):
        lo, hi = shard_bounds(n, P, RANK)
        expected = _reference(n, dtype, seed + n, op)
        buf = _input(n, dtype, seed + n, RANK)
        world.traffic.reset()
        mine = collectives.reduce_scatter(buf, op=op, algorithm=algorithm)
        moved = _moved()
        assert mine.numel() == hi - lo, f"{algorithm} n={n}"
        if mine.numel():  # a view of buf at this rank's slice, not a copy
            assert mine.data_ptr() == buf.data_ptr() + lo * buf.element_size()
        np.testing.assert_allclose(mine.double().numpy(), expected[lo:hi], rtol=rtol, atol=atol,
                                   err_msg=f"{algorithm} reduce_scatter n={n}")
        # allgather: every slice exactly its owner's bytes; the rest of buf starts as garbage
        owners = torch.full((n,), -7.0, dtype=dtype)
        owners[lo:hi] = _input(n, dtype, seed + 100 + n, RANK)[lo:hi]
        world.traffic.reset()
        assert collectives.allgather(owners, algorithm=algorithm) is owners
        moved += _moved()
        for q in range(P):
            q_lo, q_hi = shard_bounds(n, P, q)
            assert torch.equal(owners[q_lo:q_hi], _input(n, dtype, seed + 100 + n, q)[q_lo:q_hi]), \
                f"{algorithm} allgather n={n} slice {q}"
        if P > 1 and n >= P:  # every rank has a slice to give and slices to get
            assert moved > 0, f"{algorithm} n={n}: no traffic counted"
        if P == 1 or n == 0:
            assert moved == 0, f"{algorithm} n={n}: traffic counted for nothing to move"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("algorithm", HALVES)
@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_halves_match_reference(monkeypatch, algorithm, dtype):
    _fake_nodes(monkeypatch, None)  # on one real node shm runs and hier is shm
    if algorithm == "shm" and not _one_node():
        pytest.skip("shm works within one node (refused across nodes: test_shm_halves_refused_across_nodes)")
    _check_halves(algorithm, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("algorithm", ["hier", "auto", "rhd"])
@pytest.mark.parametrize("ranks_per_node", [1, 2])
@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_halves_on_fake_nodes(monkeypatch, ranks_per_node, algorithm, dtype):
    """np 4 at 2 per node: hier's two-level halves (shm + ring across); np 3 and 5 at 2 per node:
    uneven nodes (the ring fallback); 1 per node: as many nodes as ranks."""
    _fake_nodes(monkeypatch, ranks_per_node)
    _check_halves(algorithm, dtype, op="sum", seed=7)


@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_hier_halves_are_two_level_on_equal_node_major_nodes(monkeypatch):
    """At 2 ranks per node with equal nodes the reduce-scatter reads node peers' shared memory
    and sends across nodes only the node's share (n/k per rank, not (p-1)/p n as the ring)."""
    _fake_nodes(monkeypatch, 2)
    if P < 4 or P % 2:
        pytest.skip("needs equal nodes of 2 ranks, at least 2 of them")
    n = 100_000
    buf = torch.ones(n)
    world.traffic.reset()
    collectives.reduce_scatter(buf, op="sum", algorithm="hier")
    lo, hi = shard_bounds(n, P, RANK)
    assert torch.equal(buf[lo:hi], torch.full((hi - lo,), float(P)))
    assert world.traffic.shm_read > 0
    nodes = P // 2
    assert world.traffic.sent < (P - 1) * n * 4 // P  # less than the flat ring sends
    assert world.traffic.sent <= (nodes - 1) * (n // P + 1) * 4 * 2


@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_shm_halves_refused_across_nodes(monkeypatch):
    _fake_nodes(monkeypatch, 1)
    if P < 2:
        pytest.skip("needs two ranks")
    with pytest.raises(ValueError, match="spans several nodes"):
        collectives.reduce_scatter(torch.ones(64), algorithm="shm")
    with pytest.raises(ValueError, match="spans several nodes"):
        collectives.allgather(torch.ones(64), algorithm="shm")
    with pytest.raises(ValueError, match="spans several nodes"):  # as its allreduce is
        collectives.allreduce(torch.ones(64), algorithm="shm")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["float64", "float16"])
@pytest.mark.parametrize("host_half", ["ring", "mpi"])
@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_staged_halves_with_the_host_as_the_device(host_half, dtype):
    """The CUDA path without a CUDA-aware MPI, run on CPU tensors (copies are plain copies)."""
    halves = {"ring": (ring.reduce_scatter, ring.allgather), "mpi": (mpi.reduce_scatter, mpi.allgather)}
    rs, ag = halves[host_half]
    rtol, atol = TOLERANCE[dtype]
    for n in lengths(P):
        lo, hi = shard_bounds(n, P, RANK)
        buf = _input(n, dtype, 5 + n, RANK)
        mine = staging.reduce_scatter_staged(buf, COMM, rs, "avg")
        assert mine.numel() == hi - lo and (not mine.numel() or mine.data_ptr() == buf[lo:hi].data_ptr())
        np.testing.assert_allclose(mine.double().numpy(), _reference(n, dtype, 5 + n, "avg")[lo:hi],
                                   rtol=rtol, atol=atol, err_msg=f"staged {host_half} n={n}")
        expected = torch.cat([_input(n, dtype, 9, q)[slice(*shard_bounds(n, P, q))] for q in range(P)])
        buf = torch.zeros(n, dtype=dtype)
        buf[lo:hi] = expected[lo:hi]
        staging.allgather_staged(buf, COMM, ag)
        assert torch.equal(buf, expected), f"staged {host_half} allgather n={n}"


@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_auto_halves_pick_the_same_on_every_rank_and_never_tree():
    sizes = [4, 1 << 10, 64 << 10, 1 << 20, 64 << 20]
    picks = collectives.describe_auto(sizes, COMM, halves=True)
    assert COMM.allgather(picks) == [picks] * P
    for _, name in picks:
        assert name in (*HALVES, "none") and name not in ("auto", "tree")


# ---------------------------------------------------------------- serial tests
class _Comm:
    """Just enough of a communicator for the dispatcher's decision (no MPI traffic)."""

    def __init__(self, size: int):
        self.size = size

    def Get_size(self) -> int:
        return self.size


def test_halves_for_maps_tree_by_size_and_keeps_the_rest():
    for name in ("ring", "rhd", "shm", "hier", "mpi"):
        assert tuning.halves_for(name, 1 << 30, 3) == name
    assert tuning.halves_for("tree", 4 << 10, 5) == "rhd"  # latency-bound: lg p steps
    assert tuning.halves_for("tree", 16 << 20, 4) == "rhd"  # power of two: rhd is bandwidth-optimal
    assert tuning.halves_for("tree", 16 << 20, 5) == "ring"  # else the fold-in costs more


@pytest.mark.parametrize("aware", [True, False], ids=["cuda-aware", "not-cuda-aware"])
def test_halves_share_the_allreduce_decision(monkeypatch, aware):
    """``auto`` for the halves: the allreduce rules' pick, tree mapped to rhd/ring; the words of
    ``algorithm_that_runs(..., halves=True)`` name what ``_runner`` runs; every runner exists."""
    monkeypatch.setattr(world, "cuda_aware", lambda: aware)
    four = _Comm(4)
    monkeypatch.setattr(tuning, "choose", lambda nbytes, comm, dtype=None, tuning_file=None:
                        "tree" if nbytes < 1000 else "shm")
    assert collectives.describe_auto([0, 10, 5000], four, halves=True) == [(0, "none"), (10, "rhd"), (5000, "shm")]
    assert collectives.describe_auto([10], four) == [(10, "tree")]  # allreduce keeps its pick
    for name in HALVES:
        for on_cuda, device in ((False, "cpu"), (True, "cuda")):
            for nbytes in (10, 5000):
                runner = collectives._runner(name, nbytes, torch.float32, on_cuda, four, halves=True)
                assert runner in collectives._REDUCE_SCATTER and runner in collectives._ALLGATHER
            words = collectives.algorithm_that_runs(name, device, four, halves=True)
            if name == "auto" and words == "auto":
                continue
            assert words.split(" ")[0] == runner.removeprefix("staged "), (name, device, runner, words)
    with pytest.raises(ValueError, match="algorithm 'tree'"):
        collectives.algorithm_that_runs("tree", "cpu", four, halves=True)


def test_halves_dispatch_through_the_shared_decision(monkeypatch):
    called = []
    comm = _Comm(3)
    comm.Get_rank = lambda: 1

    def runner(algorithm, nbytes, dtype, on_cuda, c, tuning_file=None, halves=False):
        called.append((algorithm, nbytes, on_cuda, halves))
        return collectives.STAGED_MPI

    monkeypatch.setattr(collectives, "_runner", runner)
    monkeypatch.setitem(collectives._REDUCE_SCATTER, collectives.STAGED_MPI, lambda buf, c, op: called.append(op) or buf[3:6])
    monkeypatch.setitem(collectives._ALLGATHER, collectives.STAGED_MPI, lambda buf, c: called.append("ag") or buf)
    buf = torch.ones(9)
    collectives.reduce_scatter(buf, comm, "sum", "hier")
    assert collectives.allgather(buf, comm, "auto") is buf
    assert called == [("hier", 36, False, True), "sum", ("auto", 36, False, True), "ag"]
