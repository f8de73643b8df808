"""Collectives across real (emulated) nodes: ranks in separate network namespaces over TCP.

Run by ``make test-multinode`` (when root) under ``python -m mpilm.cluster run`` at 2 nodes x 1
rank and 2 nodes x 2 ranks, beside ``test_collectives.py``, the top-k tests of
``test_compress.py`` and the training equivalence of ``test_train.py``. Every test here skips
when the job does not span several nodes (e.g. under a plain ``mpirun`` on one machine), so the
``multinode`` marker keeps them out of the single-machine runs. Nothing here checks speed.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from mpi4py import MPI

from conftest import REDUCE_DTYPES as DTYPES
from mpilm.comm import collectives, compress, hier, shm, tuning, world
from test_shm_hier import _assert_close, _assert_identical_on, _input, _reference

COMM = MPI.COMM_WORLD
pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.multinode]


def _nodes() -> list[str]:
    return sorted(set(COMM.allgather(socket.gethostname())))  # cold path: pickle is fine


@pytest.fixture(autouse=True)
def spans_nodes(monkeypatch):
    monkeypatch.delenv("MPILM_RANKS_PER_NODE", raising=False)  # real nodes only
    if world.node_comm().Get_size() == COMM.Get_size():
        pytest.skip("the job runs on one node (launch it with python -m mpilm.cluster run)")


def test_ranks_sit_on_separate_nodes_with_their_own_cpu_sets():
    nodes = _nodes()
    assert len(nodes) >= 2
    node = world.node_comm()
    # MPI's node (shared-memory domain) is the emulated node: same hostname within, distinct across
    names = node.allgather(socket.gethostname())
    assert len(set(names)) == 1 and COMM.allreduce(1 if node.Get_rank() == 0 else 0) == len(nodes)
    # CPU sets differ between nodes, unless the cluster was brought up with --oversubscribe
    masks = COMM.allgather(sorted(__import__("os").sched_getaffinity(0)))
    assert all(masks[q] for q in range(COMM.Get_size()))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("algorithm", ["ring", "rhd", "tree", "hier", "mpi", "auto"])
def test_every_algorithm_across_nodes_matches_reference(algorithm, dtype):
    everyone = list(range(COMM.Get_size()))
    for op in ("sum", "avg"):
        for seed, n in enumerate((0, 1, COMM.Get_size() + 1, 1009, 2**16 + 3, 2**19 + 5)):
            x = _input(n, dtype, seed, COMM.Get_rank())
            assert collectives.allreduce(x, COMM, algorithm, op) is x
            what = f"{algorithm} {op} n={n} {dtype} across {len(_nodes())} nodes"
            _assert_close(x, _reference(n, dtype, seed, everyone, op), dtype, what)
            _assert_identical_on(COMM, x, what)


def test_hier_with_the_buffer_in_node_shared_memory():
    n = 2**18 + 11
    flat = shm.alloc_shared_buffer(n, torch.float32, COMM)  # one window per real node
    try:
        flat.copy_(_input(n, torch.float32, 7, COMM.Get_rank()))
        hier.allreduce(flat, COMM, op="avg")
        _assert_close(flat, _reference(n, torch.float32, 7, list(range(COMM.Get_size())), "avg"),
                      torch.float32, "hier, shared buffer, real nodes")
    finally:
        shm.free_shared_buffer(flat, COMM)


def test_shm_is_refused_across_nodes_with_its_usage_error():
    with pytest.raises(ValueError, match="spans several nodes.*use algorithm 'hier'"):
        collectives.allreduce(torch.ones(64), COMM, "shm")


@pytest.mark.parametrize("algorithm", collectives.REDUCE_SCATTER_ALGORITHMS)
def test_reduce_scatter_and_allgather_across_nodes(algorithm):
    p, r = COMM.Get_size(), COMM.Get_rank()
    n = 3 * 2**16 + 5
    x = _input(n, torch.float32, 3, r)
    if algorithm == "shm" and world.local_size() != p:  # the halves of shm stay within one node too
        with pytest.raises(ValueError, match="spans several nodes"):
            collectives.reduce_scatter(x, COMM, "avg", "shm")
        with pytest.raises(ValueError, match="spans several nodes"):
            collectives.allgather(x, COMM, "shm")
        return
    expected = _reference(n, torch.float32, 3, list(range(p)), "avg")
    lo, hi = collectives.shard_bounds(n, p, r)
    mine = collectives.reduce_scatter(x, COMM, "avg", algorithm)
    _assert_close(mine, expected[lo:hi], torch.float32, f"reduce_scatter {algorithm}")
    collectives.allgather(x, COMM, algorithm)
    _assert_close(x, expected, torch.float32, f"allgather {algorithm}")
    _assert_identical_on(COMM, x, f"allgather {algorithm}")


@pytest.mark.parametrize("aggregate", compress.TOPK_AGGREGATES)
def test_topk_across_nodes_conserves_what_it_does_not_send(aggregate):
    """Sent sum + every rank's residual == the dense sum (error feedback loses nothing)."""
    p, r = COMM.Get_size(), COMM.Get_rank()
    n = 50_000
    grad = torch.randint(-50, 51, (n,), generator=torch.Generator().manual_seed(r)).float()
    dense = grad.clone()
    collectives.allreduce(dense, COMM, "mpi", "sum")
    compressor = compress.make_compressor("topk", topk_ratio=0.01, aggregate=aggregate)
    bucket = grad.clone()
    compressor.allreduce_(bucket, 0, COMM, "auto", 0)
    residual = compressor._bucket_state(0, bucket).residual.clone()
    collectives.allreduce(residual, COMM, "mpi", "sum")
    np.testing.assert_allclose((bucket * p + residual).numpy(), dense.numpy(), rtol=0, atol=1e-3)
    _assert_identical_on(COMM, bucket, f"top-k {aggregate}")


def test_auto_picks_network_algorithms_across_nodes():
    rules, source = tuning.rules(COMM)
    if source != "built-in":
        pytest.skip(f"auto follows a tuning file here ({source})")
    chosen = {algorithm for _, algorithm in collectives.describe_auto([4 << 10, 1 << 20, 64 << 20], COMM)}
    assert "shm" not in chosen
    if tuning.ranks_per_node(COMM) > 1:
        assert chosen == {"tree", "hier"}
