"""mpilm.kernels: the C++ kernels and their torch twins agree bit for bit, and both are exact.

Serial tests. The extension is built once per machine (the first build takes ~25 s and lands in
the cache; later sessions only load it). The C++ comparisons skip only where no C++ compiler
exists or ``MPILM_KERNELS=torch`` is set; a failed build on a machine with a compiler fails here.
Inputs cover ties, all-zero and mostly-zero vectors, NaN/inf, signed zeros, inputs whose strided
sample misleads the threshold (so the retry paths run), and sizes that use several threads.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from mpilm import kernels
from mpilm.errors import UsageError

from conftest import ROOT


@pytest.fixture(scope="module")
def module():
    built = kernels.load()
    if built is None:
        if os.environ.get("MPILM_KERNELS") == "torch" or shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(f"C++ kernels unavailable here: {kernels.status()}")
        pytest.fail(f"C++ kernels did not build: {kernels.status()}")
    return built


def reference_topk(x: torch.Tensor, k: int) -> np.ndarray:
    """Exact rule: largest magnitude key first, lowest index on ties; returned in index order."""
    keys = kernels.magnitude_keys(x).numpy().astype(np.int64)
    order = np.lexsort((np.arange(keys.size), -keys))[:k]
    return np.sort(order)


def make_input(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(n, generator=gen)
    if kind == "ties":  # few distinct magnitudes: most of the boundary is ties
        return torch.randint(-3, 4, (n,), generator=gen).float()
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "signed_zeros":
        x = torch.zeros(n)
        x[::2] = -0.0
        x[n // 3:: 7] = torch.randn(len(range(n // 3, n, 7)), generator=gen)
        return x
    if kind == "mostly_zero":  # sample is all zeros, so the scan starts at "non-zero"
        x = torch.zeros(n)
        pick = torch.randperm(n, generator=gen)[: max(1, n // 200)]
        x[pick] = torch.randn(pick.numel(), generator=gen)
        return x
    if kind == "special":
        x = torch.randn(n, generator=gen)
        x[:: 97] = float("nan")
        x[5:: 89] = float("inf")
        x[7:: 83] = -float("inf")
        return x
    if kind == "aliased":  # the strided sample sees only large values: first thresholds too high
        x = torch.randn(n, generator=gen) * 1e-3
        size, stride, offset, _, _ = kernels._sample_plan(n, max(1, n // 100))
        x[offset:: stride] = 1.0 + torch.rand(len(range(offset, n, stride)), generator=gen)
        return x
    raise ValueError(kind)


KINDS = ("randn", "ties", "zeros", "signed_zeros", "mostly_zero", "special", "aliased")
SIZES = (1, 2, 63, 64, 65, 1000, 150_001)


def ks_for(n: int) -> list[int]:
    if n > 10_000:  # large inputs: the sparse regime and the all-but-one edge
        return [1, math.ceil(0.01 * n), n - 1]
    return sorted({0, 1, min(n, 2), math.ceil(0.01 * n), n // 3, max(0, n - 1), n})


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float32:
        a, b = a.view(torch.int32), b.view(torch.int32)
    return a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_topk_kernel_equals_torch_and_reference(module, kind):
    gen = torch.Generator().manual_seed(hash(kind) % 2**31)
    for n in SIZES:
        x = make_input(kind, n, gen)
        before = x.clone()
        for k in ks_for(n):
            ki, kv = kernels.topk(x, k, backend="kernel")
            ti, tv = kernels.topk(x, k, backend="torch")
            assert same_bits(ki, ti) and same_bits(kv, tv), (kind, n, k)
            assert np.array_equal(ki.numpy(), reference_topk(x, k)), (kind, n, k)
            assert same_bits(kv, x[ki.long()])
        assert same_bits(x, before), "topk must not modify its input"


def test_topk_does_not_depend_on_thread_count(module):
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.topk(x, 4000, backend="kernel")
        torch.set_num_threads(max(2, threads))
        many = kernels.topk(x, 4000, backend="kernel")
    finally:
        torch.set_num_threads(threads)
    assert same_bits(one[0], many[0]) and same_bits(one[1], many[1])


@pytest.mark.parametrize("kind", ("randn", "ties", "zeros", "special", "aliased"))
def test_residual_topk_kernel_equals_torch_and_conserves(module, kind):
    gen = torch.Generator().manual_seed(11)
    for n in (1, 65, 1000, 150_001):
        grad = make_input(kind, n, gen)
        old = torch.randn(n, generator=gen) * 0.1 if kind != "zeros" else torch.zeros(n)
        for k in ks_for(n):
            res_k, res_t = old.clone(), old.clone()
            ki, kv = kernels.residual_topk(grad, res_k, k, backend="kernel")
            ti, tv = kernels.residual_topk(grad, res_t, k, backend="torch")
            assert same_bits(ki, ti) and same_bits(kv, tv) and same_bits(res_k, res_t), (kind, n, k)
            acc = grad + old
            assert np.array_equal(ki.numpy(), reference_topk(acc, k))
            # error feedback loses nothing: sent + new residual == gradient + old residual, bit for bit
            rebuilt = res_k.clone()
            rebuilt[ki.long()] += kv
            assert same_bits(rebuilt[~torch.isnan(acc)], acc[~torch.isnan(acc)])
            assert torch.all(res_k[ki.long()] == 0)


def order_sensitive_pairs(n: int, m: int, gen: torch.Generator):
    idx = torch.randint(0, max(1, n // 8), (m,), generator=gen, dtype=torch.int32)  # many duplicates
    scale = torch.tensor([1e8, 1.0, -1e8, 3e-3])[torch.randint(0, 4, (m,), generator=gen)]
    return idx, torch.randn(m, generator=gen) * scale


@pytest.mark.parametrize("m", (0, 1, 1000, 200_000))
def test_sparse_accumulate_is_sequential_on_every_path(module, m):
    gen = torch.Generator().manual_seed(m)
    n = 50_000
    idx, val = order_sensitive_pairs(n, m, gen)
    start = torch.randn(n, generator=gen)
    expected = start.numpy().copy()
    np.add.at(expected, idx.numpy(), val.numpy())  # unbuffered: one fp32 add per pair, array order
    threads = torch.get_num_threads()
    try:
        for t in (1, max(2, threads)):
            torch.set_num_threads(t)
            via_kernel = kernels.sparse_accumulate(start.clone(), idx, val, backend="kernel")
            via_torch = kernels.sparse_accumulate(start.clone(), idx, val, backend="torch")
            assert same_bits(via_kernel, via_torch)
            assert same_bits(via_kernel, torch.from_numpy(expected))
    finally:
        torch.set_num_threads(threads)


def test_sparse_accumulate_rejects_bad_indices(module):
    dense = torch.zeros(10)
    for backend in ("kernel", "torch"):
        with pytest.raises(IndexError):
            kernels.sparse_accumulate(dense, torch.tensor([3, 10], dtype=torch.int32), torch.ones(2), backend=backend)
        with pytest.raises(IndexError):
            kernels.sparse_accumulate(dense, torch.tensor([-1], dtype=torch.int32), torch.ones(1), backend=backend)
    assert torch.all(dense == 0)


def test_argument_checks():
    x = torch.randn(10)
    with pytest.raises(TypeError):
        kernels.topk(x.double(), 2)
    with pytest.raises(ValueError):
        kernels.topk(x, 11)
    with pytest.raises(ValueError):
        kernels.topk(x, 2, out_idx=torch.empty(2, dtype=torch.int64))
    with pytest.raises(TypeError):
        kernels.sparse_accumulate(x, torch.tensor([1]), torch.ones(1))  # int64 indices
    with pytest.raises(ValueError):
        kernels.topk(x, 2, backend="fast")


def test_outputs_are_written_in_place(module):
    x = torch.randn(1000)
    out_idx, out_val = torch.empty(10, dtype=torch.int32), torch.empty(10)
    for backend in ("kernel", "torch"):
        got = kernels.topk(x, 10, out_idx, out_val, backend=backend)
        assert got[0] is out_idx and got[1] is out_val


def test_status_names_the_path(module):
    assert kernels.status().startswith("C++")


def _python(code: str, **env):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_forced_fallback_and_bad_setting(monkeypatch):
    forced = _python("import mpilm.kernels as k; print(k.status())", MPILM_KERNELS="torch")
    assert forced.returncode == 0 and "torch fallback (MPILM_KERNELS=torch)" in forced.stdout
    monkeypatch.setenv("MPILM_KERNELS", "fastest")
    with pytest.raises(UsageError, match="MPILM_KERNELS=fastest"):
        kernels._choice()


def test_make_kernels_entry_point(module):
    done = subprocess.run([sys.executable, "-m", "mpilm.kernels"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "mpilm kernels: C++" in done.stdout


# ---------------------------------------------------------------- CUDA (skipped without a GPU)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")


@needs_cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_paths_match_cpu_bit_for_bit(module, kind):
    assert module.with_cuda(), f"torch sees a GPU but the CUDA kernels were not built: {kernels.status()}"
    gen = torch.Generator().manual_seed(7)
    for n in SIZES:
        x = make_input(kind, n, gen)
        old = torch.randn(n, generator=gen)
        for k in ks_for(n):
            cpu = kernels.topk(x, k, backend="kernel")
            for backend in ("kernel", "torch"):
                gpu = kernels.topk(x.cuda(), k, backend=backend)
                assert same_bits(gpu[0].cpu(), cpu[0]) and same_bits(gpu[1].cpu(), cpu[1]), (kind, n, k, backend)
            res_cpu = old.clone()
            cpu = kernels.residual_topk(x, res_cpu, k, backend="kernel")
            for backend in ("kernel", "torch"):
                res_gpu = old.cuda()
                gpu = kernels.residual_topk(x.cuda(), res_gpu, k, backend=backend)
                assert same_bits(gpu[0].cpu(), cpu[0]) and same_bits(gpu[1].cpu(), cpu[1]), (kind, n, k, backend)
                assert same_bits(res_gpu.cpu(), res_cpu)


@needs_cuda
def test_cuda_sparse_accumulate_keeps_array_order(module):
    gen = torch.Generator().manual_seed(8)
    idx, val = order_sensitive_pairs(50_000, 200_000, gen)
    start = torch.randn(50_000, generator=gen)
    cpu = kernels.sparse_accumulate(start.clone(), idx, val, backend="kernel")
    for backend in ("kernel", "torch"):
        gpu = kernels.sparse_accumulate(start.cuda(), idx.cuda(), val.cuda(), backend=backend)
        assert same_bits(gpu.cpu(), cpu), backend
