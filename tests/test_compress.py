"""Gradient compressors: exactness of error feedback, bytes on the wire, gtopk conservation.

Serial tests run on ``MPI.COMM_SELF`` (one rank); distributed ones are marked
``@pytest.mark.mpi`` and use ``COMM_WORLD``. Gradients are small whole numbers where a test
compares sums bit for bit, so every sum is exact whatever the order of addition.
Run: ``pytest tests/test_compress.py`` and
``mpirun -np N python -m pytest --with-mpi -m mpi tests/test_compress.py`` (N = 2, 3; the tests
also marked ``collectives`` run at 1, 4 and 5 too).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_compressor_resumes_bit_exactly
from mpi4py import MPI

from mpilm import kernels
from mpilm.comm import collectives, compress, p2p, world
from mpilm.errors import UsageError

SELF = MPI.COMM_SELF


def whole_numbers(n: int, seed: int, spread: int = 50) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-spread, spread + 1, (n,), generator=gen).float()


def residual_of(compressor, key: int = 0) -> torch.Tensor:
    state = compressor._state.get(key)
    return state.residual.clone() if state is not None else None


def reduce_sum(t: torch.Tensor, comm) -> torch.Tensor:
    out = t.clone()
    comm.Allreduce(MPI.IN_PLACE, world.buf(out), op=MPI.SUM)
    return out


def same_on_every_rank(t: torch.Tensor, comm) -> bool:
    root = t.clone()
    comm.Bcast(world.buf(root), root=0)
    return bool(comm.allreduce(int(torch.equal(root, t)), op=MPI.MIN))


# ---------------------------------------------------------------- serial
def test_density_warmup_schedule():
    assert compress.density_at(0, 0.01, 100) == 0.25
    assert compress.density_at(100, 0.01, 100) == 0.01
    assert compress.density_at(5000, 0.01, 100) == 0.01
    assert compress.density_at(50, 0.01, 100) == pytest.approx(math.sqrt(0.25 * 0.01))
    steps = [compress.density_at(s, 0.01, 100) for s in range(101)]
    assert all(a > b for a, b in zip(steps, steps[1:]))
    assert compress.density_at(0, 0.5, 100) == 0.5  # target above the start: no warm-up
    assert compress.density_at(3, 0.01, 0) == 0.01


def test_topk_count_and_dense_rule():
    assert compress.topk_count(100, 0.07) == 7  # 0.07 * 100 = 7.000000000000001 in floats
    assert compress.topk_count(1000, 0.01) == 10
    assert compress.topk_count(1001, 0.01) == 11
    assert compress.topk_count(10, 1e-6) == 1 and compress.topk_count(10, 1.0) == 10
    assert compress.topk_count(0, 0.5) == 0
    assert [compress.gtopk_rounds(p) for p in (1, 2, 3, 4, 5, 8, 9)] == [0, 1, 2, 2, 3, 3, 4]
    # allgather: 8k(p-1) vs 2(p-1)/p * 4n  ->  sparse only below density 1/p
    assert compress.goes_dense(1000, 500, 2, "allgather") and not compress.goes_dense(1000, 499, 2, "allgather")
    assert not compress.goes_dense(1000, 1000, 1, "allgather")  # one rank: nothing moves either way
    # gtopk at 4 ranks: 8k x 2 rounds vs 6000 bytes
    assert compress.goes_dense(1000, 375, 4, "gtopk") and not compress.goes_dense(1000, 374, 4, "gtopk")


def test_make_compressor_refuses_what_no_option_produces():
    # the user-facing rules live in config.check (tests/test_config.py); here only programming errors
    for bad in (dict(name="zip"), dict(name="topk", topk_ratio=0), dict(name="topk", aggregate="tree"),
                dict(name="topk", momentum_correction=True, error_feedback=False),
                dict(name="topk", first_moment=0.9), dict(name="topk", first_moment=0.9, precondition=(0.95, 1e-8),
                                                          error_feedback=False)):
        with pytest.raises(ValueError):
            compress.make_compressor(**bad)
    assert set(compress.COMPRESSORS) == {"none", "fp16", "bf16", "topk", "sign"}
    assert compress.make_compressor("none").name == "none"


def test_reducers_time_themselves_and_topk_state_round_trips():
    from mpilm.comm.grad_sync import Bucket
    view = torch.arange(8, dtype=torch.float32)
    bucket = Bucket(0, torch.float32, 0, 8, ["w"], view)
    for name in compress.COMPRESSORS:
        reducer = compress.make_compressor(name, topk_ratio=0.5).bind(SELF, "auto")
        t = reducer.reduce(bucket, 0)
        assert t.bucket == 0 and t.stop >= t.start and 0 <= t.compress_s <= t.total_s
    topk = compress.make_compressor("topk", topk_ratio=0.25).bind(SELF, "auto")
    topk.reduce(Bucket(0, torch.float32, 0, 8, ["w"], torch.randn(8)), 0)
    again = compress.make_compressor("topk", topk_ratio=0.25)
    again.load_state_dict(topk.state_dict())
    assert torch.equal(again._state[0].residual, topk._state[0].residual)
    with pytest.raises(ValueError, match="reduce-scatter"):
        topk.reduce_scatter(bucket, 0)


def test_describe_names_the_kernel_path():
    text = compress.make_compressor("topk", aggregate="gtopk", warmup_steps=10, local_clip=1.0).describe()
    assert "gtopk" in text and "warm-up" in text and "local clip" in text
    assert f"kernels: {kernels.status()}" in text
    assert compress.make_compressor("bf16").describe().startswith("bf16")


@pytest.mark.parametrize("aggregate", compress.TOPK_AGGREGATES)
def test_error_feedback_loses_nothing(aggregate):
    n, ratio = 5000, 0.02
    compressor = compress.make_compressor("topk", topk_ratio=ratio, aggregate=aggregate)
    gen = torch.Generator().manual_seed(1)
    old = torch.zeros(n)
    for step in range(4):
        grad = torch.randn(n, generator=gen)
        bucket = grad.clone()
        compressor.allreduce_(bucket, 0, SELF, "auto", step)
        new = residual_of(compressor)
        k = compress.topk_count(n, ratio)
        assert int((bucket != 0).sum()) == k
        # sent + new residual == gradient + old residual, bit for bit
        assert torch.equal(bucket + new, grad + old)
        largest = np.sort(np.argsort(-(grad + old).abs().numpy(), kind="stable")[:k])
        assert np.array_equal(bucket.nonzero().squeeze(1).numpy(), largest)
        old = new


def test_no_error_feedback_drops_the_rest():
    compressor = compress.make_compressor("topk", topk_ratio=0.1, error_feedback=False)
    grad = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    bucket = grad.clone()
    compressor.allreduce_(bucket, 3, SELF, "auto", 0)
    assert compressor._state[3].residual is None
    kept = bucket != 0
    assert int(kept.sum()) == 100 and torch.equal(bucket[kept], grad[kept])


def test_momentum_correction_follows_dgc():
    n, m, ratio = 400, 0.9, 0.05
    compressor = compress.make_compressor("topk", topk_ratio=ratio, momentum_correction=True, momentum=m)
    gen = torch.Generator().manual_seed(4)
    u, v = torch.zeros(n), torch.zeros(n)
    k = compress.topk_count(n, ratio)
    for step in range(4):
        grad = torch.randn(n, generator=gen)
        u = m * u + grad
        v = v + u
        sent = kernels.topk(v, k, backend="torch")[0].long()
        expected = torch.zeros(n)
        expected[sent] = v[sent]
        v[sent] = 0
        u[sent] = 0
        bucket = grad.clone()
        compressor.allreduce_(bucket, 0, SELF, "auto", step)
        assert torch.equal(bucket, expected)
        assert torch.equal(compressor._state[0].residual, v) and torch.equal(compressor._state[0].velocity, u)


def adam_normalised(grad: torch.Tensor, v: torch.Tensor, step: int, beta2=0.95, eps=1e-8) -> torch.Tensor:
    """The reference of ``precondition``: torch AdamW's own arithmetic on v, then g / (sqrt(v)/c + eps)."""
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return grad / (v.sqrt() / math.sqrt(1 - beta2 ** (step + 1)) + eps)


def test_precondition_sends_top_k_of_the_adam_normalised_gradient_with_error_feedback():
    n, ratio = 600, 0.05
    compressor = compress.make_compressor("topk", topk_ratio=ratio, precondition=(0.95, 1e-8))
    gen = torch.Generator().manual_seed(5)
    v, residual = torch.zeros(n), torch.zeros(n)
    k = compress.topk_count(n, ratio)
    for step in range(5):
        grad = torch.randn(n, generator=gen) * torch.linspace(0.01, 10, n)  # scales differ per coordinate
        owed = residual + adam_normalised(grad, v, step)
        sent = kernels.topk(owed, k, backend="torch")[0].long()
        expected = torch.zeros(n)
        expected[sent] = owed[sent]
        residual = owed.clone()
        residual[sent] = 0
        bucket = grad.clone()
        compressor.allreduce_(bucket, 0, SELF, "auto", step)
        assert torch.equal(bucket, expected)
        assert torch.equal(compressor._state[0].second_moment, v)
        assert torch.equal(compressor._state[0].residual, residual)
    # in units of the update whatever the gradient's scale: each step owes at most 1/sqrt(1 - beta2) per entry
    assert float(bucket.abs().max()) <= 5 / math.sqrt(1 - 0.95)


def test_first_moment_is_adam_momentum_accumulated_before_the_selection():
    n, ratio, beta1 = 400, 0.05, 0.9
    compressor = compress.make_compressor("topk", topk_ratio=ratio, precondition=(0.95, 1e-8), first_moment=beta1)
    assert "first moment" in compressor.describe() and "second moment" in compressor.describe()
    gen = torch.Generator().manual_seed(6)
    second, u, owed = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    updates, delivered = torch.zeros(n), torch.zeros(n)
    k = compress.topk_count(n, ratio)
    for step in range(5):
        grad = torch.randn(n, generator=gen)
        u = beta1 * u + (1 - beta1) * adam_normalised(grad, second, step)
        updates += u
        owed = owed + u
        sent = kernels.topk(owed, k, backend="torch")[0].long()
        expected = torch.zeros(n)
        expected[sent] = owed[sent]
        owed[sent] = 0  # the first moment itself stays whole (no DGC masking)
        bucket = grad.clone()
        compressor.allreduce_(bucket, 0, SELF, "auto", step)
        delivered += bucket
        assert torch.allclose(bucket, expected, rtol=1e-5, atol=1e-6)
        assert torch.allclose(compressor._state[0].velocity, u, rtol=1e-5, atol=1e-7)
    # what was sent plus what is owed is the sum of this rank's Adam updates
    assert torch.allclose(delivered + compressor._state[0].residual, updates, rtol=1e-5, atol=1e-5)
    # a dense bucket (ratio 1 at two ranks would be; here forced by dense_steps) keeps the first moment too
    dense = compress.make_compressor("topk", topk_ratio=ratio, precondition=(0.95, 1e-8), first_moment=beta1,
                                     dense_steps=1)
    bucket = torch.ones(n)
    dense.allreduce_(bucket, 0, SELF, "auto", 0)
    assert torch.allclose(bucket, dense._state[0].velocity) and dense._state[0].velocity.abs().min() > 0


def test_dense_steps_go_dense_with_nothing_held_back_then_sparse():
    compressor = compress.make_compressor("topk", topk_ratio=0.1, dense_steps=2)
    assert "dense for the first 2 steps" in compressor.describe()
    for step, nonzero in ((0, 1000), (1, 1000), (2, 100), (3, 100)):
        bucket = torch.randn(1000, generator=torch.Generator().manual_seed(step))
        grad = bucket.clone()
        compressor.allreduce_(bucket, 0, SELF, "auto", step)
        assert int((bucket != 0).sum()) == nonzero
        if step < 2:  # one rank: the dense average is the gradient itself
            assert torch.equal(bucket, grad) and not compressor._state[0].residual.any()


def test_precondition_state_round_trips_bit_exactly():
    options = dict(topk_ratio=0.05, precondition=(0.95, 1e-8), first_moment=0.9)
    _, handed = assert_compressor_resumes_bit_exactly("topk", options, 500)
    assert set(handed["buckets"][2]) == {"residual", "velocity", "second_moment"}
    old_format = {"buckets": {0: {"residual": torch.zeros(4), "velocity": None}}}  # before second moments
    plain = compress.make_compressor("topk")
    plain.load_state_dict(old_format)
    assert plain._state[0].second_moment is None and plain._state[0].numel == 4


def test_local_clip_scales_the_bucket_norm():
    compressor = compress.make_compressor("topk", topk_ratio=1.0, local_clip=2.0)
    bucket = torch.full((100,), 3.0)  # norm 30
    compressor.allreduce_(bucket, 0, SELF, "auto", 0)
    assert bucket.norm().item() == pytest.approx(2.0, rel=1e-5)  # limit 2/sqrt(1)
    small = torch.full((100,), 0.01)  # norm 0.1: below the limit, untouched
    compressor.allreduce_(small, 1, SELF, "auto", 0)
    assert torch.all(small == 0.01)


def test_warmup_sends_more_early():
    n = 10_000
    compressor = compress.make_compressor("topk", topk_ratio=0.01, warmup_steps=10)
    counts = []
    for step in (0, 5, 10, 20):
        bucket = torch.randn(n, generator=torch.Generator().manual_seed(step))
        compressor.allreduce_(bucket, 0, SELF, "auto", step)
        counts.append(int((bucket != 0).sum()))
    assert counts == [2500, compress.topk_count(n, math.sqrt(0.25 * 0.01)), 100, 100]


def test_half_precision_reuses_its_buffer():
    compressor = compress.make_compressor("fp16")
    bucket = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    expected = bucket.half().float()
    compressor.allreduce_(bucket, 7, SELF, "auto", 0)
    first = compressor._half[7].data_ptr()
    assert torch.equal(bucket, expected)
    compressor.allreduce_(bucket, 7, SELF, "auto", 1)
    assert compressor._half[7].data_ptr() == first


def test_bench_compress_tiny(tmp_path):
    from mpilm.bench import compress as bench

    if kernels.load() is None:
        pytest.skip(f"C++ kernels unavailable: {kernels.status()}")
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "compress.json"
    args = parser.parse_args(["--sizes", "2K,20K", "--density", "0.05", "--repeats", "1", "--ranks", "2",
                              "--json", str(out), "--plot", str(tmp_path / "compress.png")])
    result = bench.run(args)
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"] and [r["elements"] for r in saved["rows"]] == [2000, 20000]
    assert saved["rows"][0]["k"] == 100 and saved["rows"][1]["pairs"] == 2000
    assert (tmp_path / "compress.png").stat().st_size > 0
    with pytest.raises(UsageError):
        bench.run(parser.parse_args(["--sizes", "1X"]))
    with pytest.raises(UsageError):
        bench.run(parser.parse_args(["--density", "0"]))


# ---------------------------------------------------------------- distributed
@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
def test_topk_ratio_one_equals_dense_allreduce():
    comm = MPI.COMM_WORLD
    grad = whole_numbers(3001, seed=comm.rank)
    dense = grad.clone()
    collectives.allreduce(dense, comm, "mpi", "avg")
    bucket = grad.clone()
    compress.make_compressor("topk", topk_ratio=1.0).allreduce_(bucket, 0, comm, "mpi", 0)
    assert torch.equal(bucket, dense)
    # and the sparse exchange itself, carrying every entry (normally replaced by the dense path)
    compressor = compress.make_compressor("topk", topk_ratio=1.0)
    sparse = grad.clone()
    state = compressor._bucket_state(0, sparse)
    compressor._select(sparse, state, sparse.numel())
    compressor._allgather_exchange_(sparse, state, sparse.numel(), comm)
    assert torch.equal(sparse, dense)


@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
@pytest.mark.parametrize("aggregate", compress.TOPK_AGGREGATES)
def test_topk_sends_k_pairs_per_bucket(aggregate):
    comm = MPI.COMM_WORLD
    p = comm.size
    ratio, sizes = 0.01, (20_000, 7_001)
    compressor = compress.make_compressor("topk", topk_ratio=ratio, aggregate=aggregate)
    world.traffic.reset()
    for key, n in enumerate(sizes):
        compressor.allreduce_(torch.randn(n, generator=torch.Generator().manual_seed(comm.rank + key)), key, comm,
                              "auto", 0)
    ks = [math.ceil(ratio * n) for n in sizes]
    if aggregate == "allgather":
        expected = sum(8 * k * (p - 1) for k in ks)
        assert world.traffic.sent == expected and world.traffic.received == expected
    else:
        core, rem, newrank = p2p.fold_in(p, comm.rank)
        rounds = core.bit_length() - 1
        if newrank < 0:  # folded in: its pairs out, the final pairs and one flag byte per pair back
            sent, received = [8 * k for k in ks], [8 * k + k for k in ks]
        elif comm.rank < 2 * rem:  # proxy: the folded rank's pairs in, the rounds, the answer out
            sent, received = [8 * k * (rounds + 1) + k for k in ks], [8 * k * (rounds + 1) for k in ks]
        else:
            sent = received = [8 * k * rounds for k in ks]
        assert (world.traffic.sent, world.traffic.received) == (sum(sent), sum(received))
    # measured compression: far below the dense ring's 2(p-1)/p x 4n bytes
    if p > 1:
        assert world.traffic.sent < 0.1 * sum(compress.dense_bytes(n, p) for n in sizes)


@pytest.mark.mpi(min_size=3)
def test_sparse_accumulation_sums_overlapping_indices():
    comm = MPI.COMM_WORLD
    p, r = comm.size, comm.rank
    n = 1000
    grad = torch.zeros(n)
    grad[0], grad[1], grad[10 + r] = 100.0 + r, -(200.0 + r), 300.0 + r  # two shared indices, one own
    bucket = grad.clone()
    compress.make_compressor("topk", topk_ratio=3 / n).allreduce_(bucket, 0, comm, "auto", 0)
    expected = torch.zeros(n)
    expected[0] = sum(100.0 + q for q in range(p))
    expected[1] = -sum(200.0 + q for q in range(p))
    for q in range(p):
        expected[10 + q] = 300.0 + q
    expected.div_(p)
    assert torch.equal(bucket, expected)


@pytest.mark.mpi(min_size=1)
@pytest.mark.collectives
@pytest.mark.parametrize("momentum_correction", (False, True))
def test_gtopk_keeps_sums_of_what_it_kept_and_conserves(momentum_correction):
    comm = MPI.COMM_WORLD
    p = comm.size
    n, ratio = 2000, 0.01
    k = compress.topk_count(n, ratio)
    compressor = compress.make_compressor("topk", topk_ratio=ratio, aggregate="gtopk",
                                          momentum_correction=momentum_correction, momentum=0.5)
    old = torch.zeros(n)
    velocity = torch.zeros(n)
    for step in range(4):
        # shared hot spots make ranks' selections overlap, so merges sum and drop entries
        grad = whole_numbers(n, seed=100 * step + comm.rank)
        grad[:30] += 1000.0
        bucket = grad.clone()
        compressor.allreduce_(bucket, 0, comm, "auto", step)
        new = residual_of(compressor)
        source = 0.5 * velocity + grad if momentum_correction else grad  # exact for these numbers
        delivered = source + old - new  # this rank's pairs that made it into the global set
        assert int((delivered != 0).sum()) <= k
        # the result is the sum of the pairs kept, averaged; the same on every rank
        assert torch.equal(bucket, reduce_sum(delivered, comm).div_(p))
        assert int((bucket != 0).sum()) <= k
        assert same_on_every_rank(bucket, comm)
        # global conservation: gradients + old residuals == p x result + new residuals
        assert torch.equal(reduce_sum(source + old, comm), reduce_sum(new, comm) + bucket * p)
        if momentum_correction:
            velocity = source.clone()
            velocity[delivered != 0] = 0
            assert torch.equal(compressor._state[0].velocity, velocity)
        old = new


@pytest.mark.mpi(min_size=2)
@pytest.mark.collectives
@pytest.mark.parametrize("name,tolerance", (("fp16", 2e-3), ("bf16", 2e-2)))
def test_half_precision_close_to_fp32(name, tolerance):
    comm = MPI.COMM_WORLD
    grad = torch.randn(10_000, generator=torch.Generator().manual_seed(comm.rank))
    dense = grad.clone()
    collectives.allreduce(dense, comm, "ring", "avg")
    bucket = grad.clone()
    world.traffic.reset()
    compress.make_compressor(name).allreduce_(bucket, 0, comm, "ring", 0)
    assert bucket.dtype == torch.float32
    assert torch.allclose(bucket, dense, rtol=tolerance, atol=tolerance)
    # 16-bit words on the wire: half the bytes of the fp32 ring (plus rounding of uneven slices)
    assert world.traffic.sent <= compress.dense_bytes(grad.numel(), comm.size) // 2 + 64
    # large gradients: their sum over the ranks would overflow fp16, their average does not
    big = torch.full((100,), 40_000.0)
    compress.make_compressor(name).allreduce_(big, 1, comm, "ring", 0)
    assert torch.allclose(big, torch.full((100,), 40_000.0), rtol=tolerance)


@pytest.mark.mpi(min_size=4)
@pytest.mark.collectives
def test_dense_fallback_during_warmup_is_identical_everywhere_and_flushes_residual():
    comm = MPI.COMM_WORLD
    n = 4000
    compressor = compress.make_compressor("topk", topk_ratio=0.01, warmup_steps=1000)
    grad = whole_numbers(n, seed=comm.rank)
    bucket = grad.clone()
    compressor.allreduce_(bucket, 0, comm, "auto", 0)  # density 25% at >= 4 ranks: dense is cheaper
    dense = grad.clone()
    collectives.allreduce(dense, comm, "auto", "avg")
    assert torch.equal(bucket, dense)
    assert torch.all(residual_of(compressor) == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")
@pytest.mark.parametrize("aggregate", compress.TOPK_AGGREGATES)
def test_topk_on_cuda_matches_cpu(aggregate):
    on_cpu = compress.make_compressor("topk", topk_ratio=0.02, aggregate=aggregate, momentum_correction=True)
    on_gpu = compress.make_compressor("topk", topk_ratio=0.02, aggregate=aggregate, momentum_correction=True)
    gen = torch.Generator().manual_seed(9)
    for step in range(3):
        grad = torch.randn(20_000, generator=gen)
        cpu, gpu = grad.clone(), grad.cuda()
        on_cpu.allreduce_(cpu, 0, SELF, "auto", step)
        on_gpu.allreduce_(gpu, 0, SELF, "auto", step)
        assert torch.equal(gpu.cpu(), cpu)
        assert torch.equal(on_gpu._state[0].residual.cpu(), on_cpu._state[0].residual)
