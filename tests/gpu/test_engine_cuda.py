"""CUDA checks of the training engine: the communication thread on its own stream, ordered after
backward by events, gives the same parameters as reducing after backward; ZeRO-1 on CUDA matches
the plain optimizer. Skipped where torch sees no GPU (the CPU versions run in
``tests/test_engine.py`` on every machine).

    timeout 600 .venv/bin/mpirun -np 2 .venv/bin/python -m pytest -q --with-mpi -m mpi tests/gpu
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch", allow_module_level=True)

pytestmark = [pytest.mark.mpi(min_size=1)]


def _train(device, overlap: bool, zero: bool = False, steps: int = 6):
    from mpi4py import MPI

    from mpilm import models, optim
    from mpilm.comm import collectives, compress
    from mpilm.comm.grad_sync import GradBuffer, broadcast_

    comm = MPI.COMM_WORLD
    torch.manual_seed(0)
    model = models.build("gpt", vocab_size=256, n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.0).to(device)
    broadcast_(model.parameters(), comm)
    grad_comm = comm.Dup()
    collectives.prepare(grad_comm)
    reducer = compress.Compressor().bind(grad_comm, "ring")
    grads = GradBuffer(model.named_parameters(), 4096, grad_comm, device, reducer=reducer, overlap=overlap,
                       shard=zero, poll_s=1e-4)
    opt = (optim.Zero1(grads, "adamw", 1e-2, 0.1, 0.9, grad_comm, "ring") if zero
           else optim.build(model.parameters(), "adamw", 1e-2, 0.1))
    g = torch.Generator(device=device).manual_seed(7 + comm.rank)
    for step in range(steps):
        grads.begin_step(step)
        grads.arm(final=True)
        x = torch.randint(0, 256, (4, 32), device=device, generator=g)
        model(x, x)[1].backward()  # no synchronize: the comm stream waits on the ready events
        grads.wait()
        opt.step()
    torch.cuda.synchronize(device)
    grads.close()
    return [p.detach().cpu() for p in model.parameters()]


@pytest.fixture
def device():
    from mpilm.comm import world

    chosen = torch.device("cuda", world.local_rank() % torch.cuda.device_count())
    torch.cuda.set_device(chosen)
    return chosen


def test_overlap_on_cuda_equals_reducing_after_backward(device):
    for a, b in zip(_train(device, overlap=True), _train(device, overlap=False)):
        assert torch.equal(a, b)


def test_zero1_on_cuda_matches_the_plain_optimizer(device):
    for a, b in zip(_train(device, overlap=True, zero=True), _train(device, overlap=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
