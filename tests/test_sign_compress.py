"""``--compress sign``: scaled sign with error feedback (1 bit per element, one fp32 scale per chunk).

The arithmetic against a reference written out plainly, the message layout, state round trips,
the option checks, and (under mpirun) identical averages on every rank and the bytes on the wire;
the bit-exact resume is a case of ``test_checkpoint_resume.py``. Run: ``pytest tests/test_sign_compress.py`` and
``mpirun -np 2 python -m pytest --with-mpi -m mpi tests/test_sign_compress.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_compressor_resumes_bit_exactly
from mpi4py import MPI

from mpilm import config, optim
from mpilm.comm import compress, world
from mpilm.errors import UsageError

SELF = MPI.COMM_SELF
ADAM = dict(precondition=(0.95, 1e-8), first_moment=0.9)  # as optim.compressor_options gives, gain aside


def whole_numbers(n: int, seed: int, spread: int = 50) -> torch.Tensor:
    """Small whole numbers: every sum below is exact, whatever the order of addition."""
    return torch.randint(-spread, spread + 1, (n,), generator=torch.Generator().manual_seed(seed)).float()


def reference_sign(e: torch.Tensor, chunk: int) -> torch.Tensor:
    """scale x sign(e) per chunk, written out: scale = mean |e| over the chunk, zero counts as positive."""
    out = torch.empty_like(e)
    for lo in range(0, e.numel(), chunk):
        part = e[lo:lo + chunk]
        scale = part.abs().sum() / part.numel()
        out[lo:lo + chunk] = torch.where(part >= 0, scale, -scale)
    return out


def test_sign_sends_scaled_signs_and_keeps_the_rest_exactly():
    n, chunk = 1003, 100  # the last chunk has 3 elements
    compressor = compress.make_compressor("sign", sign_chunk=chunk)
    assert "per 100 elements" in compressor.describe() and "error feedback" in compressor.describe()
    residual = torch.zeros(n)
    for step in range(4):
        grad = whole_numbers(n, step)
        owed = grad + residual
        expected = reference_sign(owed, chunk)
        residual = owed - expected
        bucket = grad.clone()
        compressor.allreduce_(bucket, 0, SELF, "auto", step)
        assert torch.equal(bucket, expected)
        assert torch.equal(compressor._state[0].residual, residual)
    # the message: one fp32 scale per chunk, then element 8i + j as bit j of byte i
    message = compressor._state[0].buffers["message"]
    assert message.numel() == compress.sign_message_bytes(n, chunk) == 4 * 11 + 126
    bits = torch.tensor([(int(message[44 + i // 8]) >> (i % 8)) & 1 for i in range(n)], dtype=torch.bool)
    assert torch.equal(bits, bucket > 0)
    # without error feedback what scale x sign misses is gone; one scale per bucket with chunk 0
    plain = compress.make_compressor("sign", sign_chunk=0, error_feedback=False)
    grad = whole_numbers(n, 9)
    bucket = grad.clone()
    plain.allreduce_(bucket, 0, SELF, "auto", 0)
    assert torch.equal(bucket, reference_sign(grad, n)) and plain._state[0].residual is None


def test_under_adamw_the_sum_of_adam_updates_is_what_is_sent_plus_owed():
    n, chunk, beta1, beta2 = 500, 64, 0.9, 0.95
    compressor = compress.make_compressor("sign", sign_chunk=chunk, **ADAM)
    assert "first moment" in compressor.describe() and "second moment" in compressor.describe()
    gen = torch.Generator().manual_seed(3)
    v, u, owed = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    updates, delivered = torch.zeros(n), torch.zeros(n)
    for step in range(5):
        grad = torch.randn(n, generator=gen) * torch.linspace(0.01, 10, n)  # scales differ per coordinate
        v = beta2 * v + (1 - beta2) * grad * grad
        u = beta1 * u + (1 - beta1) * grad / (v.sqrt() / math.sqrt(1 - beta2 ** (step + 1)) + 1e-8)
        updates += u
        expected = reference_sign(owed + u, chunk)
        owed = owed + u - expected
        bucket = grad.clone()
        compressor.allreduce_(bucket, 0, SELF, "auto", step)
        delivered += bucket
        assert torch.allclose(bucket, expected, rtol=1e-5, atol=1e-6)
        assert torch.allclose(compressor._state[0].first_moment, u, rtol=1e-5, atol=1e-7)
        assert torch.allclose(compressor._state[0].second_moment, v, rtol=1e-5, atol=1e-9)
    assert torch.allclose(delivered + compressor._state[0].residual, updates, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [ADAM, dict(error_feedback=False)])
def test_sign_state_round_trips_bit_exactly(options):
    straight, _ = assert_compressor_resumes_bit_exactly("sign", options, 3000)
    with pytest.raises(ValueError, match="reduce-scatter"):
        straight.reduce_scatter_(torch.randn(3000, generator=torch.Generator().manual_seed(0)), 2, SELF, "auto", 0)


def test_topk_without_error_feedback_resumes():
    """A top-k bucket with nothing to keep (no residual, no moments) starts afresh after a resume."""
    straight = compress.make_compressor("topk", topk_ratio=0.5, error_feedback=False)
    straight.allreduce_(torch.randn(8), 0, SELF, "auto", 0)
    resumed = compress.make_compressor("topk", topk_ratio=0.5, error_feedback=False)
    resumed.load_state_dict(straight.state_dict())
    a = torch.randn(8, generator=torch.Generator().manual_seed(1))
    b = a.clone()
    straight.allreduce_(a, 0, SELF, "auto", 1)
    resumed.allreduce_(b, 0, SELF, "auto", 1)
    assert torch.equal(a, b)


def test_sign_byte_model_and_dense_rule():
    assert compress.sign_message_bytes(0, 2048) == 0
    assert compress.sign_message_bytes(10, 2048) == 4 + 2  # one chunk (the whole bucket), 2 bytes of bits
    n = 1 << 20
    assert compress.dense_bytes(n, 2) / compress.sign_bytes(n, 2048, 2) > 31  # ~32x at two ranks
    assert compress.sign_bytes(n, 2048, 1) == 0
    # a one-element bucket would send 5 bytes against a dense ring's 4: it goes dense, residual flushed
    assert compress.sign_bytes(1, 2048, 2) >= compress.dense_bytes(1, 2)


def test_sign_options_are_checked():
    assert config.parse(["--compress", "sign"]).adam_variant_in_effect == optim.SIGN_ADAM
    assert config.parse(["--compress", "sign", "--optimizer", "sgd"]).adam_variant_in_effect == "plain"
    assert config.parse(["--compress", "sign", "--sync", "diloco"]).adam_variant_in_effect == "plain"
    assert config.parse(["--compress", "topk"]).adam_variant_in_effect == config.TrainConfig.topk_adam
    assert optim.compressor_options("sign", optim.SIGN_ADAM) == {**ADAM, "sqrt_ranks_gain": True}
    assert not optim.compressor_options("sign", optim.SIGN_ADAM, sign_sqrt_ranks=False)["sqrt_ranks_gain"]
    assert optim.compressor_options("sign", "plain") == {}
    assert optim.compressor_options("topk", "frozen", 3, 7) == optim.topk_adam_compressor("frozen", 3, 7)
    with pytest.raises(ValueError):
        optim.compressor_options("sign", "frozen")
    for argv, message in (
            (["--sign-chunk", "64"], "applies only with --compress sign"),
            (["--compress", "sign", "--sign-chunk", "-1"], "must be >= 0"),
            (["--compress", "sign", "--no-error-feedback"], "needs --error-feedback"),
            (["--compress", "sign", "--optimizer", "sgd", "--no-sign-sqrt-ranks"], "applies only with --compress sign"),
            (["--compress", "topk", "--no-sign-sqrt-ranks"], "applies only with --compress sign"),
            (["--compress", "sign", "--zero", "1"], "no reduce-scatter half"),
            (["--compress", "sign", "--topk-adam", "frozen"], "applies only with --compress topk")):
        with pytest.raises(UsageError, match=message):
            config.parse(argv)
    config.parse(["--compress", "sign", "--optimizer", "sgd", "--no-error-feedback"])  # plain scaled sign
    for bad in (dict(sign_chunk=-1), dict(momentum_correction=True), dict(dense_steps=2), dict(sqrt_ranks_gain=True),
                dict(first_moment=0.9),
                dict(first_moment=0.9, precondition=(0.95, 1e-8), error_feedback=False)):
        with pytest.raises(ValueError):
            compress.make_compressor("sign", **bad)


@pytest.mark.mpi(min_size=2)
def test_sign_average_is_the_same_everywhere_and_conserves_what_ranks_owe():
    comm = MPI.COMM_WORLD
    p, n, chunk = comm.Get_size(), 5000, 512
    compressor = compress.make_compressor("sign", sign_chunk=chunk)
    residual = torch.zeros(n)
    for step in range(3):
        grad = whole_numbers(n, 10 * step + comm.rank)
        owed = grad + residual
        mine = reference_sign(owed, chunk)
        residual = owed - mine
        every = torch.stack(comm.allgather(mine))
        bucket = grad.clone()
        before = world.traffic.sent
        compressor.allreduce_(bucket, 0, comm, "auto", step)
        assert world.traffic.sent - before == compress.sign_bytes(n, chunk, p)
        expected = torch.zeros(n)
        for r in range(p):  # rank order, as the compressor adds
            expected += every[r]
        assert torch.equal(bucket, expected / p)
        assert torch.equal(compressor._state[0].residual, residual)
        gathered = comm.allgather(bucket)
        assert all(torch.equal(gathered[0], b) for b in gathered)
    # a one-element bucket is cheaper dense: everything owed goes, nothing stays behind
    tiny = torch.tensor([float(comm.rank + 1)])
    compressor.allreduce_(tiny, 1, comm, "auto", 0)
    assert float(tiny) == sum(range(1, p + 1)) / p and not compressor._state[1].residual.any()


@pytest.mark.mpi(min_size=2)
def test_sqrt_ranks_gain_scales_the_adam_update_by_the_root_of_the_world_size():
    comm = MPI.COMM_WORLD
    gained = compress.make_compressor("sign", sign_chunk=128, sqrt_ranks_gain=True, **ADAM)
    plain = compress.make_compressor("sign", sign_chunk=128, **ADAM)
    assert "sqrt(ranks)" in gained.describe() and "sqrt(ranks)" not in plain.describe()
    root_p = math.sqrt(comm.Get_size())
    for step in range(3):
        grad = torch.randn(1000, generator=torch.Generator().manual_seed(7 * step + comm.rank))
        a, b = grad.clone(), grad.clone()
        gained.allreduce_(a, 0, comm, "auto", step)
        plain.allreduce_(b, 0, comm, "auto", step)
        assert torch.allclose(a, root_p * b, rtol=1e-5, atol=1e-6)  # scale x sign is linear in the scale
        assert torch.allclose(gained._state[0].first_moment, root_p * plain._state[0].first_moment, rtol=1e-5,
                              atol=1e-7)
