"""The collectives on CUDA tensors, by both routes the dispatcher has: device pointers handed to a
CUDA-aware MPI, and staging through pinned host memory (forced here, whatever the library says).
Allreduce with every algorithm name, and the reduce-scatter / allgather halves ZeRO-1 uses.
Skipped where torch sees no GPU; the CUDA-aware route also where the MPI library is not CUDA-aware
(``world.library_cuda_support()``; ``MPILM_CUDA_AWARE=1`` claims it for libraries that cannot say).

    timeout 600 .venv/bin/mpirun -np 2 .venv/bin/python -m pytest -q --with-mpi -m mpi tests/gpu
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import REDUCE_TOLERANCE as TOLERANCE

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch", allow_module_level=True)

from test_staging_cuda import _check, _input  # noqa: E402 (after the skip: that module skips alike)

pytestmark = [pytest.mark.mpi(min_size=1), pytest.mark.collectives]

ROUTES = ("cuda-aware", "staged")
SIZES = (1, 1009, 2**20 + 7)


def _library_is_cuda_aware() -> bool:
    from mpilm.comm import world

    return os.environ.get("MPILM_CUDA_AWARE") == "1" or bool(world.library_cuda_support())


@pytest.fixture
def route(request, monkeypatch, device):
    """Pins ``world.cuda_aware()`` to the route under test (what ``collectives._route`` asks)."""
    from mpilm.comm import world

    aware = request.param == "cuda-aware"
    if aware and not _library_is_cuda_aware():
        pytest.skip(f"{world.library_version()} is not CUDA-aware: only the staged route runs here")
    monkeypatch.setattr(world, "cuda_aware", lambda: aware)
    return request.param


@pytest.fixture
def device():
    from mpilm.comm import world

    chosen = torch.device("cuda", world.local_rank() % torch.cuda.device_count())
    torch.cuda.set_device(chosen)
    return chosen


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("algorithm", ["ring", "rhd", "tree", "shm", "hier", "mpi", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_allreduce_of_cuda_tensors(route, device, algorithm, dtype):
    from mpilm.comm import collectives
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    said = collectives.algorithm_that_runs(algorithm, device, comm)
    if comm.Get_size() > 1:
        assert ("staged through host memory" in said) == (route == "staged"), said
    for seed, n in enumerate(SIZES):
        x = _input(n, dtype, seed, comm.Get_rank()).to(device)
        collectives.allreduce(x, comm, algorithm=algorithm, op="avg")
        _check(x, n, dtype, seed, "avg", f"{route} {algorithm} n={n} {dtype} ({said})")


@pytest.mark.parametrize("route", ROUTES, indirect=True)
@pytest.mark.parametrize("algorithm", ["ring", "rhd", "shm", "hier", "mpi", "auto"])
def test_reduce_scatter_then_allgather_of_cuda_tensors(route, device, algorithm):
    """ZeRO-1's halves: this rank's shard averaged (a view of the buffer, on the GPU), then every shard."""
    from mpilm.comm import collectives
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    p, r = comm.Get_size(), comm.Get_rank()
    rtol, atol = TOLERANCE[torch.float32]
    for seed, n in enumerate(SIZES):
        x = _input(n, torch.float32, 20 + seed, r).to(device)
        expected = sum(_input(n, torch.float32, 20 + seed, q).double() for q in range(p)) / p
        lo, hi = collectives.shard_bounds(n, p, r)
        mine = collectives.reduce_scatter(x, comm, op="avg", algorithm=algorithm)
        assert mine.is_cuda and mine.numel() == hi - lo
        if mine.numel():
            assert mine.data_ptr() == x.data_ptr() + lo * x.element_size()
        torch.testing.assert_close(mine.cpu().double(), expected[lo:hi], rtol=rtol, atol=atol)
        collectives.allgather(x, comm, algorithm=algorithm)
        torch.testing.assert_close(x.cpu().double(), expected, rtol=rtol, atol=atol, msg=f"{route} {algorithm} n={n}")
