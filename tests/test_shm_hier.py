"""Node-aware collectives: ``shm`` (one node, shared-memory window), ``hier`` (many nodes), and
the pipelined host staging of device buffers run with the host as the "device".

Run at any world size, with and without fake nodes (``MPILM_RANKS_PER_NODE``, read by
``world.node_comm`` at call time; every rank sets the same value)::

    timeout 600 .venv/bin/mpirun -np 5 .venv/bin/python -m pytest -q --with-mpi -m mpi tests/test_shm_hier.py

Every check compares against a float64 numpy reference built from all ranks' inputs (each rank
regenerates them from seeds) and checks that all ranks hold bit-identical results.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conftest import REDUCE_DTYPES as DTYPES
from conftest import REDUCE_TOLERANCE as TOLERANCE

pytestmark = [pytest.mark.mpi(min_size=1), pytest.mark.collectives]



def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _lengths(p: int) -> list[int]:
    return sorted({0, 1, max(p - 1, 0), p + 1, 1009, 2**16 + 3})


def _input(n: int, dtype: torch.dtype, seed: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(n, generator=generator, dtype=torch.float64).to(dtype)


def _reference(n: int, dtype: torch.dtype, seed: int, ranks: list[int], op: str) -> np.ndarray:
    total = sum(_input(n, dtype, seed, q).double().numpy() for q in ranks)
    return total / len(ranks) if op == "avg" else total


def _assert_close(result: torch.Tensor, expected: np.ndarray, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOLERANCE[dtype]
    np.testing.assert_allclose(result.double().numpy(), expected, rtol=rtol, atol=atol, err_msg=what)


def _assert_identical_on(comm, result: torch.Tensor, what: str) -> None:
    """Every rank of ``comm`` holds the same bytes (one owner computed each element)."""
    raw = result.view(torch.uint8).numpy() if result.numel() else np.zeros(0, np.uint8)
    everyone = np.empty(comm.Get_size() * raw.size, dtype=np.uint8)
    comm.Allgather(raw, everyone)
    for q, theirs in enumerate(everyone.reshape(comm.Get_size(), raw.size)):
        assert np.array_equal(theirs, raw), f"{what}: rank {q} of the group holds different bytes"


def _fake_nodes(monkeypatch, ranks_per_node: int | None) -> None:
    if ranks_per_node is None:
        monkeypatch.delenv("MPILM_RANKS_PER_NODE", raising=False)
    else:
        monkeypatch.setenv("MPILM_RANKS_PER_NODE", str(ranks_per_node))


# ---------------------------------------------------------------- shm
# ONESHOT_BYTES: the default (small lengths one-shot, large two-shot), all two-shot, all one-shot
PROTOCOLS = {"default": None, "two-shot": -1, "one-shot": 1 << 40}


def _protocol(monkeypatch, protocol: str) -> None:
    from mpilm.comm import shm

    if PROTOCOLS[protocol] is not None:
        monkeypatch.setattr(shm, "ONESHOT_BYTES", PROTOCOLS[protocol])  # the same on every rank


@pytest.fixture(params=["native", "python"])
def path(request, monkeypatch):
    """The C++ allreduce (kernels/mpilm_shm.cpp) or shm.py's own; both must give the same bytes."""
    from mpilm.comm import shm

    if request.param == "python":
        monkeypatch.setattr(shm, "NATIVE", False)  # the same on every rank
    return request.param


def test_shm_native_path_is_used_when_built():
    from mpilm import kernels
    from mpilm.comm import shm

    comm = _world()
    if comm.Get_size() < 2:
        pytest.skip("needs two ranks")
    group = shm._node_of(comm)[1]
    assert (group.native is not None) == (kernels.load() is not None), kernels.status()
    assert shm.implementation(comm).startswith("C++" if group.native is not None else "Python")


def test_shm_implementation_says_python_when_forced(monkeypatch):
    from mpilm.comm import shm

    monkeypatch.setattr(shm, "NATIVE", False)
    assert shm.implementation(_world()) == "Python (shm.NATIVE is False)"


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("ranks_per_node", [None, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_shm_matches_reference(monkeypatch, ranks_per_node, dtype, protocol, path):
    from mpilm.comm import shm, world

    _fake_nodes(monkeypatch, ranks_per_node)
    _protocol(monkeypatch, protocol)
    comm = _world()
    node = world.node_comm(comm)  # shm runs on one (real or fake) node
    members = node.allgather(comm.Get_rank())  # world ranks of my node, for the reference
    for op in ("sum", "avg"):
        for seed, n in enumerate(_lengths(node.Get_size())):
            x = _input(n, dtype, seed, comm.Get_rank())
            out = shm.allreduce(x, node, op=op)
            assert out is x
            what = f"shm {op} n={n} {dtype} node of {node.Get_size()}"
            _assert_close(x, _reference(n, dtype, seed, members, op), dtype, what)
            _assert_identical_on(node, x, what)


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_shm_native_and_python_paths_give_the_same_bytes(monkeypatch, dtype, shared):
    """Same summation order in C++ and Python, whatever the protocol."""
    from mpilm import kernels
    from mpilm.comm import shm

    comm = _world()
    if comm.Get_size() < 2 or kernels.load() is None:
        pytest.skip("needs two ranks and the C++ kernels")
    lengths = [1, 1009, 2**16 + 3]
    memory = shm.alloc_shared_buffer(max(lengths), dtype, comm) if shared else None
    for oneshot_bytes in (-1, 1 << 40):
        monkeypatch.setattr(shm, "ONESHOT_BYTES", oneshot_bytes)
        for seed, n in enumerate(lengths):
            results = []
            for native in (True, False):
                monkeypatch.setattr(shm, "NATIVE", native)  # the same on every rank
                x = memory[:n] if shared else torch.empty(n, dtype=dtype)
                x.copy_(_input(n, dtype, seed, comm.Get_rank()))
                shm.allreduce(x, comm, op="avg")
                results.append(x.clone())
            what = f"n={n} {dtype} oneshot_bytes={oneshot_bytes}"
            assert torch.equal(results[0].view(torch.uint8), results[1].view(torch.uint8)), what
            _assert_identical_on(comm, results[0], what)
    if shared:
        shm.free_shared_buffer(memory, comm)


@pytest.mark.parametrize("protocol", ["one-shot", "two-shot"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_shm_blocked_reduction_matches_reference(monkeypatch, dtype, protocol, path):
    """Regions longer than REDUCE_BLOCK are summed, divided and published block by block."""
    from mpilm.comm import shm

    monkeypatch.setattr(shm, "REDUCE_BLOCK", 257)  # the same on every rank
    _protocol(monkeypatch, protocol)
    comm = _world()
    everyone = list(range(comm.Get_size()))
    for seed, n in enumerate([1009, 2**16 + 3]):
        x = _input(n, dtype, seed, comm.Get_rank())
        shm.allreduce(x, comm, op="avg")
        _assert_close(x, _reference(n, dtype, seed, everyone, "avg"), dtype, f"blocked n={n} {dtype}")
        _assert_identical_on(comm, x, f"blocked n={n} {dtype}")


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_shm_halves_match_reference(dtype, shared):
    """reduce_scatter and allgather; in shared buffers allgather pushes each slice to the peers."""
    from mpilm.comm import shm
    from mpilm.comm.common import shard_bounds

    comm = _world()
    p, r = comm.Get_size(), comm.Get_rank()
    everyone = list(range(p))
    lengths = _lengths(p)
    memory = shm.alloc_shared_buffer(max(lengths), dtype, comm) if shared else None
    for seed, n in enumerate(lengths):
        x = memory[:n] if shared else torch.empty(n, dtype=dtype)
        x.copy_(_input(n, dtype, seed, r))
        before = x.clone()
        mine = shm.reduce_scatter(x, comm, op="avg")
        lo, hi = shard_bounds(n, p, r)
        assert mine.data_ptr() == x[lo:hi].data_ptr() or n == 0
        expected = _reference(n, dtype, seed, everyone, "avg")
        _assert_close(mine, expected[lo:hi], dtype, f"reduce_scatter n={n}")
        assert torch.equal(x[:lo], before[:lo]) and torch.equal(x[hi:], before[hi:])
        x.zero_()
        x[lo:hi] = _input(n, dtype, seed, r)[lo:hi]
        shm.allgather(x, comm)
        for q in everyone:
            q_lo, q_hi = shard_bounds(n, p, q)
            assert torch.equal(x[q_lo:q_hi], _input(n, dtype, seed, q)[q_lo:q_hi]), f"allgather n={n} slice {q}"
    if shared:
        shm.free_shared_buffer(memory, comm)


def test_shm_rejects_a_communicator_spanning_nodes(monkeypatch):
    from mpilm.comm import shm

    comm = _world()
    if comm.Get_size() < 2:
        pytest.skip("needs two fake nodes")
    _fake_nodes(monkeypatch, 1)
    with pytest.raises(ValueError, match="use algorithm 'hier'"):
        shm.allreduce(torch.ones(8), comm)


def test_shm_length_mismatch_raises_on_every_rank(path):
    from mpilm.comm import shm

    comm = _world()
    if comm.Get_size() < 2:
        pytest.skip("needs two ranks")
    # checked before any rank grows its scratch window for a larger length, so no hang either way
    for length in (100, 10**6):
        with pytest.raises(ValueError, match="different collectives"):
            shm.allreduce(torch.ones(length + comm.Get_rank()), comm)
    with pytest.raises(ValueError, match="different collectives"):
        if comm.Get_rank() == 0:
            shm.reduce_scatter(torch.ones(64), comm)
        else:
            shm.allgather(torch.ones(64), comm)
    x = torch.ones(64)  # and the group still works afterwards
    shm.allreduce(x, comm, op="sum")
    assert torch.equal(x, torch.full((64,), float(comm.Get_size())))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_shm_shared_buffer_zero_copy_and_mixed(monkeypatch, protocol, path):
    """Buffers from alloc_shared_buffer (whole, bucket views, mixed with private) are reduced in
    place: two-shot pushes when every buffer is shared, pulls when one is private."""
    from mpilm.comm import shm

    _protocol(monkeypatch, protocol)

    comm = _world()
    p, r = comm.Get_size(), comm.Get_rank()
    n = 3001
    flat = shm.alloc_shared_buffer(n, torch.float32, comm)
    assert flat.numel() == n and flat.dtype == torch.float32
    windows = shm.live_windows()
    for op in ("sum", "avg"):
        flat.copy_(_input(n, torch.float32, 1, r))
        shm.allreduce(flat, comm, op=op)
        _assert_close(flat, _reference(n, torch.float32, 1, list(range(p)), op), torch.float32, f"shared {op}")
    # buckets: views at different offsets of the shared buffer
    flat.copy_(_input(n, torch.float32, 2, r))
    expected = _reference(n, torch.float32, 2, list(range(p)), "avg")
    for lo, hi in [(0, 1000), (1000, 1001), (1001, 3001)]:
        shm.allreduce(flat[lo:hi], comm, op="avg")
    _assert_close(flat, expected, torch.float32, "shared buckets")
    _allreduce_mixed(comm, flat, 3, "sum", "mixed")
    shm.free_shared_buffer(flat, comm)
    assert shm.live_windows() == windows - 1
    with pytest.raises(ValueError, match="does not lie"):
        shm.free_shared_buffer(torch.ones(3), comm)


def test_shm_shared_rank_waits_while_a_private_peer_grows_the_scratch(path):
    """Rank 0 passes a shared buffer (the C++ path needs no scratch), the others a private one
    too large for the scratch they have not made yet: every rank grows it, then finishes."""
    from mpilm.comm import shm

    comm = _world().Dup()  # a fresh node group: no scratch window yet (kept until exit, like any group)
    n = (shm.MIN_SCRATCH_BYTES // 4) * 3  # float32: larger than a first scratch half
    flat = shm.alloc_shared_buffer(n, torch.float32, comm)
    _allreduce_mixed(comm, flat, 7, "avg", "grown")
    shm.free_shared_buffer(flat, comm)


def _allreduce_mixed(comm, flat: torch.Tensor, seed: int, op: str, what: str) -> None:
    """Rank 0 reduces ``flat`` (in shared memory), the others a private buffer: all get the answer."""
    from mpilm.comm import shm

    n, r = flat.numel(), comm.Get_rank()
    x = flat if r == 0 else torch.empty(n)
    x.copy_(_input(n, torch.float32, seed, r))
    shm.allreduce(x, comm, op=op)
    _assert_close(x, _reference(n, torch.float32, seed, list(range(comm.Get_size())), op), torch.float32, what)
    _assert_identical_on(comm, x, what)


def test_shm_reuses_windows_over_many_calls(path):
    """1000 calls of varying sizes: no new windows after the largest size, no RSS growth."""
    from mpilm.comm import shm

    comm = _world()
    sizes = random.Random(1234).choices(range(0, 40000), k=1000)  # the same list on every rank
    x = torch.ones(max(sizes))
    shm.allreduce(x, comm)  # grows the scratch window to the largest size once
    windows = shm.live_windows()
    rss_before = _rss_bytes()
    for n in sizes:
        shm.allreduce(x[:n], comm, op="avg")
    assert shm.live_windows() == windows
    growth = _rss_bytes() - rss_before
    assert growth < 8 << 20, f"resident memory grew by {growth / 2**20:.1f} MiB over 1000 calls"
    assert torch.equal(x, torch.ones_like(x))  # averaging equal inputs keeps them


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- shared-memory traffic
def _counted(call) -> dict:
    from mpilm.comm import world

    before = world.traffic.snapshot()
    call()
    after = world.traffic.snapshot()
    return {key: after[key] - before[key] for key in after}


@pytest.mark.parametrize("case", ["one-shot", "pull", "push", "mixed"])
def test_shm_allreduce_counts_shared_memory_traffic(monkeypatch, case, path):
    """Bytes read from / written into the peers' shared memory, from the protocol's shape, on
    both paths; MPI's sent/received stay put. n elements of e bytes, p ranks, m of them mine:
    one-shot reads (p-1) n e; pull reads (p-1) m e + (n-m) e; push reads and writes (p-1) m e."""
    from mpilm.comm import shm
    from mpilm.comm.common import shard_bounds

    _fake_nodes(monkeypatch, None)
    comm = _world()
    p, r = comm.Get_size(), comm.Get_rank()
    n = 1000 if case == "one-shot" else 100_003  # one-shot: (p-1) x 4000 bytes <= ONESHOT_BYTES
    e = 4
    lo, hi = shard_bounds(n, p, r)
    m = hi - lo
    shared = case == "push" or (case == "mixed" and r == 0)
    x = shm.alloc_shared_buffer(n, torch.float32, comm) if case in ("push", "mixed") else None
    buf = x if shared else torch.empty(n)
    buf.copy_(_input(n, torch.float32, 3, r))
    moved = _counted(lambda: shm.allreduce(buf, comm, op="sum"))
    _assert_close(buf, _reference(n, torch.float32, 3, list(range(p)), "sum"), torch.float32, case)
    if x is not None:
        shm.free_shared_buffer(x, comm)
    assert moved["sent"] == moved["received"] == 0, moved
    if p == 1:
        assert moved == dict.fromkeys(moved, 0)
        return
    expected = {
        "one-shot": ((p - 1) * n * e, 0),
        "pull": ((p - 1) * m * e + (n - m) * e, 0),
        "mixed": ((p - 1) * m * e + (n - m) * e, 0),  # one private input: everyone pulls
        "push": ((p - 1) * m * e, (p - 1) * m * e),
    }[case]
    assert (moved["shm_read"], moved["shm_written"]) == expected, (case, path, moved)
    # over the node: what is written into peers is what they did not have to read (push), and
    # every rank's result came out of shared memory once (pull: (p-1) n e read to reduce + (p-1) n e to gather)
    from mpi4py import MPI

    totals = np.array([moved["shm_read"], moved["shm_written"]], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, totals)
    if case in ("pull", "mixed"):
        assert totals.tolist() == [2 * (p - 1) * n * e, 0]
    elif case == "push":
        assert totals.tolist() == [(p - 1) * n * e, (p - 1) * n * e]


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_shm_halves_count_shared_memory_traffic(monkeypatch, shared):
    from mpilm.comm import shm
    from mpilm.comm.common import shard_bounds

    _fake_nodes(monkeypatch, None)
    comm = _world()
    p, r = comm.Get_size(), comm.Get_rank()
    n, e = 50_001, 8
    m = shard_bounds(n, p, r)[1] - shard_bounds(n, p, r)[0]
    x = shm.alloc_shared_buffer(n, torch.float64, comm) if shared else torch.empty(n, dtype=torch.float64)
    x.copy_(_input(n, torch.float64, 4, r))
    scattered = _counted(lambda: shm.reduce_scatter(x, comm, op="sum"))
    gathered = _counted(lambda: shm.allgather(x, comm))
    _assert_close(x, _reference(n, torch.float64, 4, list(range(p)), "sum"), torch.float64, "halves")
    if shared:
        shm.free_shared_buffer(x, comm)
    if p == 1:
        assert scattered == dict.fromkeys(scattered, 0) and gathered == scattered
        return
    assert scattered == {"sent": 0, "received": 0, "shm_read": (p - 1) * m * e, "shm_written": 0}
    if shared:  # push: my slice stored into every peer's buffer
        assert gathered == {"sent": 0, "received": 0, "shm_read": 0, "shm_written": (p - 1) * m * e}
    else:  # pull: the peers' slices read out of their scratch
        assert gathered == {"sent": 0, "received": 0, "shm_read": (n - m) * e, "shm_written": 0}


# ---------------------------------------------------------------- hier
@pytest.mark.parametrize("ranks_per_node", [None, 1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_hier_matches_reference(monkeypatch, ranks_per_node, dtype):
    """Even and uneven fake nodes (e.g. -np 5 with 2 per node: 2+2+1; with 3: 3+2)."""
    from mpilm.comm import hier

    _fake_nodes(monkeypatch, ranks_per_node)
    comm = _world()
    everyone = list(range(comm.Get_size()))
    for op in ("sum", "avg"):
        for seed, n in enumerate(_lengths(comm.Get_size())):
            x = _input(n, dtype, seed, comm.Get_rank())
            assert hier.allreduce(x, comm, op=op) is x
            what = f"hier {op} n={n} {dtype} {ranks_per_node} ranks per node"
            _assert_close(x, _reference(n, dtype, seed, everyone, op), dtype, what)
            _assert_identical_on(comm, x, what)


@pytest.mark.parametrize("ranks_per_node", [None, 1, 2])
def test_hier_counts_shared_memory_inside_nodes_and_mpi_across(monkeypatch, ranks_per_node):
    """Inside a node hier pulls its peers' regions (private buffer) through shared memory, counted
    in shm_read; across nodes its ring/rhd count sent/received."""
    from mpilm.comm import hier

    _fake_nodes(monkeypatch, ranks_per_node)
    comm = _world()
    n, e = 70_001, 4
    x = _input(n, torch.float32, 6, comm.Get_rank())
    moved = _counted(lambda: hier.allreduce(x, comm, op="avg"))
    _assert_close(x, _reference(n, torch.float32, 6, list(range(comm.Get_size())), "avg"), torch.float32, "hier")
    layout = hier._layout(comm) if comm.Get_size() > 1 else None
    if layout is None:
        assert moved == dict.fromkeys(moved, 0)
        return
    k, me = layout.node.Get_size(), layout.node.Get_rank()
    lo, hi = layout.bounds(n)[me]
    m = hi - lo
    if layout.nodes == 1:  # plain shm: pull, or one-shot if small (it is not)
        assert moved["shm_read"] == (k - 1) * m * e + (n - m) * e and moved["sent"] == 0
        return
    assert moved["shm_read"] == ((k - 1) * m * e + (n - m) * e if k > 1 else 0), moved
    assert moved["shm_written"] == 0
    assert moved["sent"] > 0 and moved["received"] > 0


def test_hier_through_dispatcher_with_shared_buffer(monkeypatch):
    """``collectives.allreduce(algorithm="hier")`` with the flat buffer in shared memory."""
    from mpilm.comm import collectives, shm

    _fake_nodes(monkeypatch, 2)
    comm = _world()
    n = 2**15 + 7
    flat = shm.alloc_shared_buffer(n, torch.float32, comm)
    flat.copy_(_input(n, torch.float32, 5, comm.Get_rank()))
    collectives.allreduce(flat, comm, algorithm="hier", op="avg")
    _assert_close(flat, _reference(n, torch.float32, 5, list(range(comm.Get_size())), "avg"), torch.float32, "hier shared")
    shm.free_shared_buffer(flat, comm)


# ---------------------------------------------------------------- staging, host as the device
@pytest.mark.parametrize("algorithm", ["ring", "mpi"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_staged_pipeline_on_host_matches_reference(algorithm, dtype):
    """The GPU staging pipeline, run with CPU tensors (same code, copies without streams)."""
    from mpilm.comm import staging, world

    comm = _world()
    everyone = list(range(comm.Get_size()))
    sent_before = world.traffic.sent
    for op in ("sum", "avg"):
        for seed, n in enumerate(_lengths(comm.Get_size())):
            x = _input(n, dtype, seed, comm.Get_rank())
            # about 16 segments per buffer (at least 1 KiB), so the pipeline really overlaps
            segment_bytes = max(1024, n * x.element_size() // 16)
            assert staging.allreduce_staged(x, comm, algorithm, op, segment_bytes=segment_bytes) is x
            what = f"staged {algorithm} {op} n={n} {dtype}"
            _assert_close(x, _reference(n, dtype, seed, everyone, op), dtype, what)
            _assert_identical_on(comm, x, what)
    if comm.Get_size() > 1:
        assert world.traffic.sent > sent_before


def test_staged_rejects_bad_arguments():
    from mpilm.comm import staging

    with pytest.raises(ValueError, match="algorithm"):
        staging.allreduce_staged(torch.ones(4), None, "bogus", "avg")
    with pytest.raises(ValueError, match="segment_bytes"):
        staging.allreduce_staged(torch.ones(4), None, "ring", "avg", segment_bytes=0)
