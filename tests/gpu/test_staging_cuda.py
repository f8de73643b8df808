"""CUDA checks of the host staging path (``mpilm.comm.staging``) and of the CUDA routes of
``shm``/``hier``. Skipped where torch sees no GPU; the same pipeline runs with CPU tensors in
``tests/test_shm_hier.py`` on every machine.

    timeout 600 .venv/bin/mpirun -np 2 .venv/bin/python -m pytest -q --with-mpi -m mpi tests/gpu

Ranks share GPUs round-robin by node rank (one GPU serves every rank fine).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REDUCE_DTYPES as DTYPES
from conftest import REDUCE_TOLERANCE as TOLERANCE

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch", allow_module_level=True)

pytestmark = [pytest.mark.mpi(min_size=1), pytest.mark.collectives]



def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture
def device():
    from mpilm.comm import world

    chosen = torch.device("cuda", world.local_rank() % torch.cuda.device_count())
    torch.cuda.set_device(chosen)
    return chosen


def _input(n: int, dtype: torch.dtype, seed: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(n, generator=generator, dtype=torch.float64).to(dtype)


def _reference(n: int, dtype: torch.dtype, seed: int, p: int, op: str) -> np.ndarray:
    total = sum(_input(n, dtype, seed, q).double().numpy() for q in range(p))
    return total / p if op == "avg" else total


def _check(result: torch.Tensor, n: int, dtype: torch.dtype, seed: int, op: str, what: str) -> None:
    assert result.is_cuda, what
    rtol, atol = TOLERANCE[dtype]
    expected = _reference(n, dtype, seed, _world().Get_size(), op)
    np.testing.assert_allclose(result.cpu().double().numpy(), expected, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("algorithm", ["ring", "mpi"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_staged_on_cuda_matches_reference(device, algorithm, dtype):
    from mpilm.comm import staging

    comm = _world()
    p = comm.Get_size()
    for op in ("sum", "avg"):
        for seed, n in enumerate(sorted({0, 1, max(p - 1, 0), p + 1, 1009, 2**16 + 3, 2**21 + 1})):
            x = _input(n, dtype, seed, comm.Get_rank()).to(device)
            segment_bytes = max(1024, n * x.element_size() // 16)  # many segments in flight
            staging.allreduce_staged(x, comm, algorithm, op, segment_bytes=segment_bytes)
            _check(x, n, dtype, seed, op, f"staged {algorithm} {op} n={n} {dtype}")


def test_staged_waits_for_the_producing_stream(device):
    """buf is still being written by queued kernels when the call starts: the copies must wait."""
    from mpilm.comm import staging

    comm = _world()
    n = 2**22
    x = torch.zeros(n, device=device)
    big = torch.randn(4096, 4096, device=device)
    for _ in range(8):  # keep the stream busy for a while before x gets its value
        big = big @ big / 4096
    x.add_(float(comm.Get_rank() + 1))  # queued behind the matmuls, not yet done
    staging.allreduce_staged(x, comm, "ring", "sum", segment_bytes=1 << 20)
    p = comm.Get_size()
    assert torch.equal(x, torch.full_like(x, p * (p + 1) / 2))


@pytest.mark.parametrize("algorithm", ["ring", "shm", "hier", "auto", "mpi"])
def test_collectives_on_cuda_tensors(device, algorithm):
    """The dispatcher stages CUDA tensors when MPI is not CUDA-aware (shm/hier use the device ring)."""
    from mpilm.comm import collectives

    comm = _world()
    n = 300007
    x = _input(n, torch.float32, 9, comm.Get_rank()).to(device)
    collectives.allreduce(x, comm, algorithm=algorithm, op="avg")
    _check(x, n, torch.float32, 9, "avg", f"collectives {algorithm} on cuda")
