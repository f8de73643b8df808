"""Gradient compression on CUDA buckets: the CUDA kernels (compiled by nvcc through
``mpilm.kernels``) against their torch twins, end to end through the top-k reducer (selection with
error feedback, the exchange, the sparse accumulation), and both against the CPU run; the half
precision reducers on CUDA against the dense fp32 average. Skipped where torch sees no GPU; the
kernel-level CUDA checks are in ``tests/test_kernels.py`` (``make gpu-check`` runs them too).

    timeout 600 .venv/bin/mpirun -np 2 .venv/bin/python -m pytest -q --with-mpi -m mpi tests/gpu
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch", allow_module_level=True)

pytestmark = [pytest.mark.mpi(min_size=1), pytest.mark.collectives]

N = 200_003  # a bucket: k = 2001 pairs at density 1%, sparse at every world size the tests run at
# one fp32 ulp: the average divides by p, which CUDA computes as a multiply by 1/p (exact for 2, 4)
ULP = 2.0**-23


@pytest.fixture
def device():
    from mpilm.comm import world

    chosen = torch.device("cuda", world.local_rank() % torch.cuda.device_count())
    torch.cuda.set_device(chosen)
    return chosen


def test_cuda_kernels_are_built_with_nvcc():
    from mpilm import kernels

    module = kernels.load(verbose=True)
    assert module is not None and module.with_cuda(), (
        f"CUDA kernels not built: {kernels.status()} (needs nvcc: a CUDA toolkit matching torch's CUDA "
        f"{torch.version.cuda}, found through CUDA_HOME or PATH)")
    assert kernels.status().startswith("C++ + CUDA")


def _topk_steps(device, aggregate: str, steps: int = 3):
    """Buckets after each step and the final residual, of one top-k compressor on ``device``."""
    from mpi4py import MPI

    from mpilm.comm import compress

    comm = MPI.COMM_WORLD
    compressor = compress.make_compressor("topk", topk_ratio=0.01, aggregate=aggregate)
    g = torch.Generator().manual_seed(100 + comm.Get_rank())
    buckets = []
    for step in range(steps):
        bucket = torch.randn(N, generator=g).to(device)
        compressor.allreduce_(bucket, 0, comm, "ring", step)
        buckets.append(bucket.cpu())
    return buckets, compressor.state_dict()["buckets"][0]["residual"].cpu()


@pytest.mark.parametrize("aggregate", ["allgather", "gtopk"])
def test_topk_reducer_on_cuda_kernels_equals_torch_twin_and_cpu(device, aggregate, monkeypatch):
    from mpilm import kernels

    assert kernels.load() is not None and kernels.load().with_cuda(), kernels.status()
    with_kernels = _topk_steps(device, aggregate)
    cpu = _topk_steps(torch.device("cpu"), aggregate)
    monkeypatch.setattr(kernels, "_kernel_for", lambda t, backend: None)  # every call takes the torch twin
    twin = _topk_steps(device, aggregate)
    for step, (a, b, c) in enumerate(zip(with_kernels[0], twin[0], cpu[0])):
        assert torch.equal(a, b), f"{aggregate} step {step}: CUDA kernels and torch twin differ"
        torch.testing.assert_close(a, c, rtol=2 * ULP, atol=0, msg=f"{aggregate} step {step}: CUDA vs CPU")
        assert torch.count_nonzero(a) > 0
    # the residual (gradient + old residual - what was sent) involves no division: exact everywhere
    assert torch.equal(with_kernels[1], twin[1]) and torch.equal(with_kernels[1], cpu[1])


@pytest.mark.parametrize("name,tolerance", (("fp16", 2e-3), ("bf16", 2e-2)))
def test_half_precision_reducers_on_cuda_are_close_to_fp32(device, name, tolerance):
    from mpi4py import MPI

    from mpilm.comm import collectives, compress

    comm = MPI.COMM_WORLD
    grad = torch.randn(N, generator=torch.Generator().manual_seed(comm.Get_rank())).to(device)
    dense = grad.clone()
    collectives.allreduce(dense, comm, "ring", "avg")
    bucket = grad.clone()
    compress.make_compressor(name).allreduce_(bucket, 0, comm, "ring", 0)
    assert bucket.is_cuda and bucket.dtype == torch.float32
    torch.testing.assert_close(bucket, dense, rtol=tolerance, atol=tolerance)
