"""Correctness of mpilm's Allreduce algorithms, their halves, byte accounting and ``auto``'s tuning.

Distributed tests run under ``mpirun -np N pytest --with-mpi`` at N = 1..5 (``collectives``
marker), so the fold-in of non-power-of-two world sizes (3, 5) and lengths smaller than the
world are exercised. Every algorithm is compared with a float64 numpy reference: exactly on
integer-valued data (sums small enough to be exact in every dtype), to a rounding-error bound on
random data, and the result must be bit-identical on all ranks. Serial tests cover the tuning
file (parsing, validation, merging) and the fold-in map. Nothing here checks speed.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI

from conftest import isolated_collective_settings

from mpilm.comm import collectives, p2p, ring, rhd, tree, tuning, world
from mpilm.comm.common import shard_bounds

COMM = MPI.COMM_WORLD
P, RANK = COMM.Get_size(), COMM.Get_rank()
OURS = ("ring", "rhd", "tree")
TESTED = (*OURS, "mpi", "auto")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# unit roundoff of each dtype, for the error bound on random data
EPS = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
mpi_collective = [pytest.mark.mpi(min_size=1), pytest.mark.collectives]


def lengths(p: int) -> list[int]:
    return sorted({0, 1, max(p - 1, 0), p + 1, 1009, 2**16 + 3})


def inputs(n: int, seed: int, kind: str) -> np.ndarray:
    """Every rank's input as a (P, n) float64 array (each rank takes its own row)."""
    rng = np.random.default_rng(seed)
    if kind == "integers":
        return rng.integers(-8, 9, size=(P, n)).astype(np.float64)
    return rng.standard_normal((P, n))


def same_on_all_ranks(t: torch.Tensor) -> bool:
    mine = t.contiguous().view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
    every = np.empty((P, mine.size), np.uint8)
    COMM.Allgather(mine, every)
    return bool((every == every[0]).all())


isolated_settings = pytest.fixture(autouse=True, scope="module")(isolated_collective_settings)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("algorithm", TESTED)
@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_allreduce_matches_reference(algorithm, dtype):
    for n in lengths(P):
        for op in ("sum", "avg"):
            # integer-valued data: every partial sum is exact, so the result is exact
            rows = inputs(n, seed=n, kind="integers")
            buf = torch.tensor(rows[RANK], dtype=dtype)
            out = collectives.allreduce(buf, algorithm=algorithm, op=op)
            assert out is buf
            expected = torch.from_numpy(rows.sum(0)).to(dtype)
            if op == "avg":
                expected = expected.div_(P)  # the average rounds like a division in the dtype
            assert torch.equal(buf, expected), f"{algorithm} {dtype} n={n} op={op}: not exact"
            assert same_on_all_ranks(buf), f"{algorithm} {dtype} n={n} op={op}: ranks differ"

            # random data: within p roundings of the partial sums' magnitude
            rows = inputs(n, seed=1000 + n, kind="normal")
            rows = torch.from_numpy(rows).to(dtype).double().numpy()  # what the ranks really hold
            buf = torch.tensor(rows[RANK], dtype=dtype)
            collectives.allreduce(buf, algorithm=algorithm, op=op)
            scale = 1.0 if op == "sum" else 1.0 / P
            reference = rows.sum(0) * scale
            bound = (P + 1) * EPS[dtype] * np.abs(rows).sum(0) * scale + 1e-300
            error = np.abs(buf.double().numpy() - reference)
            assert (error <= bound).all(), (
                f"{algorithm} {dtype} n={n} op={op}: error {error.max():.3g} beyond the rounding bound")
            if algorithm != "mpi":
                assert same_on_all_ranks(buf), f"{algorithm} {dtype} n={n} op={op}: ranks differ"


@pytest.mark.parametrize("algorithm,segment_bytes", [("ring", 64 << 10), ("rhd", 48 << 10), ("tree", 40 << 10)])
@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_large_buffer_many_segments(algorithm, segment_bytes):
    """3M elements cut into small segments: the pipelined paths run many rounds of the window."""
    n = 3_000_003 if algorithm == "ring" else 300_007
    base = torch.arange(n, dtype=torch.float32) % 97
    buf = base * (RANK + 1)  # sum over ranks: base * P(P+1)/2, exact in fp32
    module = {"ring": ring, "rhd": rhd, "tree": tree}[algorithm]
    module.allreduce(buf, COMM, "sum", segment_bytes=segment_bytes)
    assert torch.equal(buf, base * (P * (P + 1) // 2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
@pytest.mark.parametrize("algorithm", ["ring", "rhd"])
@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_pipelined_paths_on_odd_lengths(algorithm, dtype):
    """Tiny segments force the windowed, pipelined paths on lengths that split unevenly."""
    module = {"ring": ring, "rhd": rhd}[algorithm]
    for n in sorted({1, P + 1, 1009, 4099}):
        rows = inputs(n, seed=11 + n, kind="integers")
        buf = torch.tensor(rows[RANK], dtype=dtype)
        module.allreduce(buf, COMM, "avg", segment_bytes=256)
        assert torch.equal(buf, torch.from_numpy(rows.sum(0)).to(dtype).div_(P)), f"n={n}"
        assert same_on_all_ranks(buf)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_tree_widened_half_types_in_several_segments(dtype):
    """tree widens half types to fp32 per segment; several segments must stitch back correctly."""
    n = 10_007
    rows = inputs(n, seed=7, kind="integers")
    buf = torch.tensor(rows[RANK], dtype=dtype)
    tree.allreduce(buf, COMM, "avg", segment_bytes=4096)
    expected = torch.from_numpy(rows.sum(0)).to(dtype).div_(P)
    assert torch.equal(buf, expected)


@pytest.mark.parametrize("rs_algorithm,ag_algorithm", [("ring", "ring"), ("mpi", "mpi"), ("ring", "mpi")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_reduce_scatter_then_allgather_is_allreduce(rs_algorithm, ag_algorithm, dtype):
    for n in lengths(P):
        rows = inputs(n, seed=3 + n, kind="integers")
        buf = torch.tensor(rows[RANK], dtype=dtype)
        lo, hi = shard_bounds(n, P, RANK)
        mine = collectives.reduce_scatter(buf, op="avg", algorithm=rs_algorithm)
        expected = torch.from_numpy(rows.sum(0)).to(dtype).div_(P)
        assert mine.numel() == hi - lo
        if mine.numel():  # a view of buf at this rank's slice, not a copy
            assert mine.data_ptr() == buf.data_ptr() + lo * buf.element_size()
        assert torch.equal(mine, expected[lo:hi])
        collectives.allgather(buf, algorithm=ag_algorithm)
        assert torch.equal(buf, expected), f"n={n}"


@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_traffic_counters():
    n, itemsize = 10_001, 4
    size = [hi - lo for lo, hi in (shard_bounds(n, P, c) for c in range(P))]
    world.traffic.reset()
    collectives.allreduce(torch.ones(n), algorithm="ring", op="sum")
    if P == 1:
        assert (world.traffic.sent, world.traffic.received) == (0, 0)
        return
    # ring: reduce-scatter sends every chunk but our own, allgather every chunk but our right's
    assert world.traffic.sent == (2 * n - size[RANK] - size[(RANK + 1) % P]) * itemsize
    assert world.traffic.received == (2 * n - size[(RANK - 1) % P] - size[RANK]) * itemsize
    for algorithm in ("rhd", "tree"):
        world.traffic.reset()
        collectives.allreduce(torch.ones(n), algorithm=algorithm, op="sum")
        assert world.traffic.sent > 0 and world.traffic.received > 0
        totals = np.array([world.traffic.sent, world.traffic.received], dtype=np.int64)
        COMM.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
        assert totals[0] == totals[1], f"{algorithm}: bytes sent and received over all ranks differ"
    world.traffic.reset()
    collectives.allreduce(torch.ones(n), algorithm="mpi", op="sum")
    assert world.traffic.sent == world.traffic.received == 2 * (P - 1) * n * itemsize // P


@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_auto_follows_a_tuning_file_and_survives_a_broken_one(capfd):
    if P == 1:
        assert collectives.describe_auto([4096]) == [(4096, "none")]
        return
    directory = COMM.bcast(tempfile.mkdtemp(prefix="mpilm-tuning-") if RANK == 0 else None)
    path = Path(directory) / "tuning.json"
    rpn = tuning.ranks_per_node(COMM)
    if RANK == 0:
        tuning.write_entry(path, P, rpn, torch.float32, [[1000, "ring"], [None, "tree"]])
        tuning.write_entry(path, P, rpn, torch.bfloat16, [[None, "rhd"]])
    COMM.Barrier()
    try:
        assert collectives.describe_auto([8, 1000, 1001], tuning_file=path) == [
            (8, "ring"), (1000, "ring"), (1001, "tree")]
        # a dtype with its own entry uses it; others fall back to the float32 entry
        assert tuning.choose(8, COMM, torch.bfloat16, path) == "rhd"
        assert tuning.choose(8, COMM, torch.float16, path) == "ring"
        tuning.use_file(path)
        buf = torch.ones(100)
        collectives.allreduce(buf, algorithm="auto", op="sum")
        assert torch.equal(buf, torch.full((100,), float(P)))

        capfd.readouterr()
        COMM.Barrier()
        if RANK == 0:
            path.write_text('{"format": "mpilm-allreduce-tuning", "version": 1, "entries": {"np2')
        COMM.Barrier()
        tuning.forget()
        for _ in range(2):  # warned once, then silently built-in
            assert tuning.choose(8, COMM) == tuning.pick(tuning.builtin_rules(P, tuning.ranks_per_node(COMM)), 8)
            tuning.forget()
        err = capfd.readouterr().err
        if RANK == 0:
            assert err.count("warning: allreduce tuning file") == 1, err
            assert "built-in" in err
        else:
            assert "warning" not in err
    finally:
        tuning.use_file(Path(tempfile.gettempdir()) / "mpilm-tests-no-such-tuning-file.json")
        COMM.Barrier()
        if RANK == 0:
            path.unlink(missing_ok=True)
            os.rmdir(directory)


@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_auto_choice_is_the_same_on_every_rank():
    sizes = [0, 4, 4 << 10, 64 << 10, 1 << 20, 64 << 20]
    names = [name for _, name in collectives.describe_auto(sizes)]
    every = COMM.allgather(names)
    assert all(other == names for other in every)


@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_prepare_does_the_collective_set_up_up_front():
    sub = COMM.Split(color=0, key=RANK)  # a fresh communicator: nothing cached on it yet
    try:
        assert sub.Get_attr(p2p._GROUP_KEYVAL) is None
        collectives.prepare(sub)
        assert sub.Get_attr(p2p._GROUP_KEYVAL) is not None
        buf = torch.ones(33)
        collectives.allreduce(buf, sub, "auto", "sum")
        assert torch.equal(buf, torch.full((33,), float(P)))
        handle = sub.py2f()
        assert P == 1 or any(key[0] == handle for key in tuning._fast)
    finally:
        sub.Free()  # frees the private duplicate too
    # auto's cached choices leave with the communicator (MPI may reuse its handle)
    assert not any(key[0] == handle for key in tuning._fast)


# ---------------------------------------------------------------- serial tests
def test_bad_arguments_raise_value_error():
    buf = torch.ones(4)
    with pytest.raises(ValueError, match="algorithm 'nope'"):
        collectives.allreduce(buf, algorithm="nope")
    with pytest.raises(ValueError, match="op 'max'"):
        collectives.allreduce(buf, op="max")
    with pytest.raises(ValueError, match="1-D contiguous"):
        collectives.allreduce(torch.ones(2, 2))
    with pytest.raises(ValueError, match="algorithm 'tree'"):  # tree has no halves
        collectives.reduce_scatter(buf, algorithm="tree")
    with pytest.raises(ValueError, match="algorithm 'tree'"):
        collectives.allgather(buf, algorithm="tree")


@pytest.mark.parametrize("p", range(1, 18))
def test_fold_in_map_covers_the_power_of_two_core(p):
    cores = [p2p.fold_in(p, r) for r in range(p)]
    core, rem = cores[0][0], cores[0][1]
    assert core & (core - 1) == 0 and core <= p < 2 * core and rem == p - core
    members = [newrank for _, _, newrank in cores if newrank >= 0]
    assert sorted(members) == list(range(core))
    for r, (_, _, newrank) in enumerate(cores):
        if newrank >= 0:
            assert p2p.core_to_rank(newrank, rem) == r


def test_shard_bounds_partition_any_length():
    for n in (0, 1, 2, 5, 1009):
        for p in (1, 2, 3, 5, 8):
            bounds = [shard_bounds(n, p, r) for r in range(p)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[i][1] == bounds[i + 1][0] for i in range(p - 1))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_rules_from_timings_pick_the_fastest_and_switch_between_sizes():
    sizes = [1024, 4096, 16384, 65536]
    times = {"tree": [1, 2, 9, 40], "ring": [5, 3, 4, 20], "rhd": [6, 4, 5, 10]}
    rules = tuning.rules_from_timings(sizes, times)
    assert rules == [[8192, "tree"], [32768, "ring"], [None, "rhd"]]
    assert [tuning.pick(rules, s) for s in sizes] == ["tree", "tree", "ring", "rhd"]


def test_tuning_file_round_trip_and_validation(tmp_path):
    path = tmp_path / "sub" / "tuning.json"
    tuning.write_entry(path, 4, 2, torch.float32, [[65536, "tree"], [None, "ring"]], iters=20)
    tuning.write_entry(path, 8, 4, torch.float32, [[None, "rhd"]])
    data = tuning.read_file(path)
    assert set(data["entries"]) == {"np4-rpn2-float32", "np8-rpn4-float32"}
    assert data["entries"]["np4-rpn2-float32"]["rules"] == [[65536, "tree"], [None, "ring"]]
    assert data["entries"]["np4-rpn2-float32"]["iters"] == 20

    broken = {
        "not json": "{",
        "wrong format": json.dumps({"format": "other", "version": 1, "entries": {}}),
        "unknown algorithm": json.dumps({"format": tuning.FORMAT, "version": 1,
                                         "entries": {"k": {"rules": [[None, "magic"]]}}}),
        "last rule bounded": json.dumps({"format": tuning.FORMAT, "version": 1,
                                         "entries": {"k": {"rules": [[10, "ring"]]}}}),
        "decreasing": json.dumps({"format": tuning.FORMAT, "version": 1,
                                  "entries": {"k": {"rules": [[10, "ring"], [5, "tree"], [None, "rhd"]]}}}),
    }
    for name, text in broken.items():
        path.write_text(text)
        with pytest.raises(tuning.TuningFileError):
            tuning.read_file(path)
    # writing over an unusable file replaces it instead of failing
    tuning.write_entry(path, 2, 2, torch.float16, [[None, "ring"]])
    assert list(tuning.read_file(path)["entries"]) == ["np2-rpn2-float16"]


def test_tuning_path_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MPILM_TUNING", str(tmp_path / "env.json"))
    tuning.use_file(None)
    try:
        assert tuning.tuning_path() == tmp_path / "env.json"
        tuning.use_file(tmp_path / "explicit.json")
        assert tuning.tuning_path() == tmp_path / "explicit.json"
        assert tuning.tuning_path(tmp_path / "arg.json") == tmp_path / "arg.json"
        monkeypatch.delenv("MPILM_TUNING")
        tuning.use_file(None)
        assert tuning.tuning_path() == tuning.DEFAULT_PATH.expanduser()
    finally:
        tuning.use_file(None)


def test_builtin_rules_use_shared_memory_on_one_node():
    for p in (2, 3, 4, 5, 8):
        assert {tuning.pick(tuning.builtin_rules(p, p), size) for size in (4 << 10, 64 << 10, 256 << 20)} == {"shm"}


def test_builtin_rules_go_hierarchical_when_nodes_hold_several_ranks():
    for p, rpn in ((4, 2), (6, 3), (5, 2)):
        rules = tuning.builtin_rules(p, rpn)
        assert tuning.pick(rules, 4 << 10) == "tree" and tuning.pick(rules, 16 << 20) == "hier"


def test_builtin_rules_prefer_low_latency_for_small_messages():
    for p in (2, 3, 4, 5, 8):
        rules = tuning.builtin_rules(p, 1)
        assert rules == tuning.builtin_rules(p)  # several nodes, or not known
        assert tuning.pick(rules, 4 << 10) == "tree"
        assert tuning.pick(rules, 256 << 20) in ("ring", "rhd")


# ---------------------------------------------------------------- what really runs
class _Comm:
    """Stands in for a communicator of ``size`` ranks where only the size is asked."""

    def __init__(self, size: int):
        self.size = size

    def Get_size(self) -> int:
        return self.size


@pytest.mark.parametrize("aware", [True, False], ids=["cuda-aware", "not-cuda-aware"])
def test_algorithm_that_runs_follows_the_dispatch(monkeypatch, aware):
    monkeypatch.setattr(world, "cuda_aware", lambda: aware)
    two = _Comm(2)
    for name in collectives.ALGORITHMS:  # host buffers run what was asked
        assert collectives.algorithm_that_runs(name, "cpu", two) == name
        assert collectives.algorithm_that_runs(name, torch.device("cpu"), two) == name
        assert collectives.algorithm_that_runs(name, "cuda:0", _Comm(1)).startswith("none")
    says = {name: collectives.algorithm_that_runs(name, "cuda", two) for name in collectives.ALGORITHMS}
    if aware:
        assert says["ring"] == "ring" and says["rhd"] == "rhd" and says["tree"] == "tree"
        assert says["mpi"] == "mpi" and says["auto"] == "auto"
        assert says["shm"] == "ring (shm has no GPU path: CUDA buffers take the ring)"
        assert says["hier"] == "ring (hier has no GPU path: CUDA buffers take the ring)"
    else:
        staged = "staged through host memory: MPI is not CUDA-aware"
        assert says["ring"] == says["auto"] == f"ring ({staged})"
        assert says["mpi"] == f"mpi ({staged})"
        for name in ("rhd", "tree", "shm", "hier"):
            assert says[name] == f"ring ({staged}; {name} has no staged variant)"
    with pytest.raises(ValueError, match="algorithm 'nope'"):
        collectives.algorithm_that_runs("nope", "cpu", two)


@pytest.mark.parametrize("aware", [True, False], ids=["cuda-aware", "not-cuda-aware"])
def test_runner_is_what_the_words_say_and_what_describe_auto_reports(monkeypatch, aware):
    """``_runner`` (the dispatcher's decision) agrees with ``algorithm_that_runs``' words, and
    ``describe_auto(..., device=)`` reports what runs after ``auto`` picks."""
    monkeypatch.setattr(world, "cuda_aware", lambda: aware)
    two = _Comm(2)
    monkeypatch.setattr(tuning, "choose", lambda nbytes, comm, dtype=None, tuning_file=None:
                        "shm" if nbytes < 1000 else "rhd")
    for name in collectives.ALGORITHMS:
        for on_cuda, device in ((False, "cpu"), (True, "cuda")):
            runner = collectives._runner(name, 100, torch.float32, on_cuda, two)
            assert runner in collectives._RUN
            words = collectives.algorithm_that_runs(name, device, two)
            if name == "auto" and words == "auto":
                continue
            expected = runner.removeprefix("staged ")
            assert words.split(" ")[0] == expected, (name, device, runner, words)
            assert runner.startswith("staged") == ("staged" in words)
    assert collectives.describe_auto([0, 10, 5000], two) == [(0, "none"), (10, "shm"), (5000, "rhd")]
    on_gpu = collectives.describe_auto([0, 10, 5000], two, device="cuda")
    if aware:
        assert on_gpu == [(0, "none"), (10, "ring"), (5000, "rhd")]
    else:
        assert on_gpu == [(0, "none"), (10, "staged ring"), (5000, "staged ring")]


def test_allreduce_dispatches_through_the_shared_decision(monkeypatch):
    called = []
    comm = _Comm(3)
    monkeypatch.setattr(collectives, "_runner", lambda algorithm, nbytes, dtype, on_cuda, c, tuning_file=None:
                        (called.append((algorithm, nbytes, on_cuda, c)), collectives.STAGED_RING)[1])
    monkeypatch.setitem(collectives._RUN, collectives.STAGED_RING, lambda buf, c, op: called.append(op) or buf)
    buf = torch.ones(8)
    assert collectives.allreduce(buf, comm, "shm", "sum") is buf
    assert called == [("shm", 32, False, comm), "sum"]


# ---------------------------------------------------------------- threads
@pytest.mark.parametrize("mine,theirs", [("ring", "hier"), ("mpi", "tree"), ("rhd", "auto")])
@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_collectives_from_two_threads_on_two_communicators(mine, theirs):
    """A communication thread runs collectives on its communicator while the main thread runs
    others on its own: results exact, and the traffic counted equals the calls run one by one."""
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        pytest.skip("MPI did not grant MPI_THREAD_MULTIPLE")
    main_comm, thread_comm = COMM.Dup(), COMM.Dup()  # not freed: MPI may reuse handles of cached comms
    collectives.prepare(main_comm)
    collectives.prepare(thread_comm)
    calls, n = 12, 30_011

    def run(comm, algorithm, results):
        for i in range(calls):
            buf = torch.full((n,), float(RANK + i))
            collectives.allreduce(buf, comm, algorithm, "sum")
            results.append(bool(torch.equal(buf, torch.full((n,), float(P * (P - 1) // 2 + P * i)))))

    def traffic_of(both):
        COMM.Barrier()
        before = world.traffic.snapshot()
        main_results, thread_results = [], []
        if both:
            worker = threading.Thread(target=run, args=(thread_comm, theirs, thread_results))
            worker.start()
            run(main_comm, mine, main_results)
            worker.join()
        else:
            run(thread_comm, theirs, thread_results)
            run(main_comm, mine, main_results)
        after = world.traffic.snapshot()
        assert all(main_results) and len(main_results) == calls, f"{mine} on the main thread"
        assert all(thread_results) and len(thread_results) == calls, f"{theirs} on the thread"
        return {key: after[key] - before[key] for key in after}

    one_by_one = traffic_of(both=False)
    assert traffic_of(both=True) == one_by_one
