"""The training engine: overlap on == off to the bit, ZeRO-1 == plain, Run state round trips, threads.

Distributed (``mpirun -np 2`` and ``-np 3`` in ``make test``). Models are tiny; buckets are small so
there are many of them and the communication thread really runs beside backward.
"""

import dataclasses
import threading

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpilm import config, models, optim, run
from mpilm.comm import collectives, compress, world
from mpilm.comm.collectives import shard_bounds
from mpilm.comm.grad_sync import GradBuffer, broadcast_
from mpilm.errors import UsageError

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--log-every", "5", "--eval-batches", "1", "--bucket-mb", "0.01", "--out", "unused"]


def tiny_model(seed=0, unused=False):
    torch.manual_seed(seed)
    model = models.build("gpt", vocab_size=256, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)
    if unused:  # a parameter that never gets a gradient (DDP's find_unused_parameters case)
        model.register_parameter("unused_gain", torch.nn.Parameter(torch.ones(40)))
    return model


def train_low_level(overlap, accum, unused, comm, steps=10, zero=False, clip=0.0, compressor="none"):
    """10 AdamW steps through a GradBuffer (the engine without Run's data and timing)."""
    model = tiny_model(unused=unused)
    broadcast_(model.parameters(), comm)
    grad_comm = comm.Dup()
    collectives.prepare(grad_comm)
    reducer = compress.make_compressor(compressor).bind(grad_comm, "ring")
    grads = GradBuffer(model.named_parameters(), 1024, grad_comm, reducer=reducer, overlap=overlap, shard=zero)
    if zero:
        opt = optim.Zero1(grads, "adamw", 1e-2, 0.1, 0.9, grad_comm, "ring")
    else:
        opt = optim.build(model.parameters(), "adamw", 1e-2, 0.1)
    g = torch.Generator().manual_seed(100 + comm.rank)
    for step in range(steps):
        grads.begin_step(step)
        for micro in range(accum):
            grads.arm(final=micro == accum - 1)
            x = torch.randint(0, 256, (3, 16), generator=g)
            (model(x, x)[1] / accum).backward()
        grads.wait()
        if zero:
            optim.clip_(opt.shard_grads, clip, comm)
            opt.step()
        else:
            optim.clip_(list(grads.flat.values()), clip)
            opt.step()
    grads.close()
    return model, grads, opt


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("unused", [False, True])
def test_overlap_on_and_off_give_bit_identical_parameters(accum, unused):
    comm = MPI.COMM_WORLD
    on, grads_on, _ = train_low_level(True, accum, unused, comm, clip=1.0)
    off, grads_off, _ = train_low_level(False, accum, unused, comm, clip=1.0)
    assert len(grads_on.buckets) > 5 and grads_on.overlap and not grads_off.overlap
    for (name, a), b in zip(on.named_parameters(), off.parameters()):
        assert torch.equal(a, b), name
    if unused:  # its gradient reduced as zeros: AdamW leaves it, weight decay aside (a 1-D gain: no decay)
        assert torch.equal(on.unused_gain, torch.ones(40))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("compressor", ["none", "bf16"])
def test_zero1_matches_the_unsharded_optimizer(compressor):
    """fp32 CPU: same parameters after 10 steps; buckets of 1 KiB split tensors at shard boundaries."""
    comm = MPI.COMM_WORLD
    plain, grads, opt = train_low_level(True, 1, False, comm, compressor=compressor)
    sharded, zgrads, zopt = train_low_level(True, 1, False, comm, zero=True, compressor=compressor)
    # some shard boundary falls inside a parameter (not only between parameters)
    cuts = [b.start + shard_bounds(b.numel, comm.size, q)[0] for b in zgrads.buckets for q in range(1, comm.size)]
    inside = any(start < cut < stop for cut in cuts for _, _, start, stop in zgrads.layout)
    assert inside
    for (name, a), b in zip(plain.named_parameters(), sharded.parameters()):
        assert torch.equal(a, b), name
    full, mine = optim.state_bytes(opt), optim.state_bytes(zopt.inner)
    n = comm.size
    assert zopt.numel == pytest.approx(grads.numel / n, abs=len(zgrads.buckets) + 1)
    assert mine < full * (1 / n + 0.05)  # state shrinks with N (step counters per piece aside)
    sizes = comm.allgather(zopt.numel)
    assert sum(sizes) == grads.numel  # the shards cover every element exactly once


@pytest.mark.mpi(min_size=2)
def test_zero1_with_clipping_uses_the_global_norm():
    comm = MPI.COMM_WORLD
    plain, *_ = train_low_level(False, 1, False, comm, clip=0.05)
    sharded, *_ = train_low_level(True, 1, False, comm, zero=True, clip=0.05)
    # the norm is summed in another order, so the clip scale differs in the last bit; Adam then
    # amplifies that on entries whose gradients are near zero (the key biases): ~2e-6 after 10 steps
    for (name, a), b in zip(plain.named_parameters(), sharded.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("extra", [[], ["--zero", "1"], ["--compress", "topk", "--topk-ratio", "0.1"],
                                   ["--grad-accum", "2", "--dropout", "0.1"]])
def test_run_state_dict_round_trips(extra):
    """build, 5 steps, save; fresh build, load, 5 more == 10 steps straight (bit for bit)."""
    cfg = config.parse([*TINY, "--steps", "10", "--overlap", *extra])  # the communication thread runs
    straight = run.build(cfg)
    for _ in range(10):
        straight.step()
    first = run.build(cfg)
    for _ in range(5):
        first.step()
    state = first.state_dict()
    for _ in range(3):
        first.step()  # the saved state must not move with the live run
    resumed = run.build(cfg, corpus=first.corpus)
    resumed.load_state_dict(state)
    assert resumed.step_index == 5
    for _ in range(5):
        resumed.step()
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    for job in (straight, first, resumed):
        job.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("extra, refused", [([], None), (["--zero", "1"], "sharded over those ranks"),
                                            (["--compress", "topk", "--topk-ratio", "0.5"], "error-feedback residuals"),
                                            (["--sync", "local", "--local-steps", "2"], "its own parameters")])
def test_state_of_another_world_size_continues_only_when_no_rank_holds_its_own(extra, refused):
    cfg = config.parse([*TINY, "--steps", "2", *extra])
    job = run.build(cfg)
    job.step()  # top-k holds residuals from its first step on
    state = job.state_dict()
    state["world_size"] += 1
    if refused is None:
        job.load_state_dict(state)  # synchronous: every rank's copy is the same
    else:
        with pytest.raises(UsageError, match=refused):
            job.load_state_dict(state)
    job.close()


@pytest.mark.mpi(min_size=2)
def test_comm_thread_beside_main_thread_collectives_does_not_deadlock():
    """While buckets reduce on the communication thread, the main thread runs its own collectives
    (eval's Allreduce, logging) on another communicator: both finish, results right."""
    comm = MPI.COMM_WORLD
    model = tiny_model()
    broadcast_(model.parameters(), comm)
    grad_comm = comm.Dup()
    collectives.prepare(grad_comm)
    reducer = compress.Compressor().bind(grad_comm, "ring")
    grads = GradBuffer(model.named_parameters(), 1024, grad_comm, reducer=reducer, overlap=True)
    for step in range(5):
        grads.begin_step(step)
        grads.arm(final=True)
        x = torch.randint(0, 256, (2, 16))
        model(x, x)[1].backward()  # buckets are in flight on the comm thread now
        for _ in range(20):  # main-thread collectives meanwhile, on the world communicator
            value = np.array([comm.rank + 1.0])
            comm.Allreduce(MPI.IN_PLACE, value, op=MPI.SUM)
            assert value[0] == comm.size * (comm.size + 1) / 2
            collectives.allreduce(torch.ones(1000), comm, "ring", "avg")
        timings = grads.wait()
        assert [t.bucket for t in timings] == list(range(len(grads.buckets)))
    grads.close()
    assert not any(t.name == "mpilm-comm" for t in threading.enumerate())


@pytest.mark.mpi(min_size=2)
def test_an_error_on_the_comm_thread_surfaces_in_wait():
    comm = MPI.COMM_WORLD
    model = tiny_model()
    grad_comm = comm.Dup()

    class Broken(compress.Compressor):
        def reduce(self, bucket, step):
            raise RuntimeError(f"injected failure in bucket {bucket.index}")

    grads = GradBuffer(model.named_parameters(), 1024, grad_comm, reducer=Broken().bind(grad_comm, "ring"), overlap=True)
    grads.begin_step(0)
    grads.arm(final=True)
    x = torch.randint(0, 256, (2, 16))
    model(x, x)[1].backward()
    with pytest.raises(RuntimeError, match="injected failure in bucket 0"):
        grads.wait()
    grads.close()


def test_thread_level_too_low_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(MPI, "Query_thread", lambda: MPI.THREAD_SERIALIZED)
    with pytest.raises(UsageError, match="overlap"):
        world.require_thread_level(MPI.THREAD_MULTIPLE, "--overlap reduces gradients on a communication thread")


def test_overlap_and_zero_options_parse():
    cfg = config.parse(["--no-overlap", "--zero", "1"])
    assert cfg.overlap is False and cfg.zero == 1
    assert config.parse([]).overlap is None and dataclasses.asdict(cfg)["zero"] == 1  # unset: decided by Run


@pytest.mark.mpi(min_size=2)
def test_overlap_unset_is_on_except_for_shared_memory_on_one_cpu_node():
    from mpilm.comm import world

    one_node = world.local_size() == MPI.COMM_WORLD.size
    for algorithm, expected in (("ring", True), ("shm", False), ("auto", not one_node)):
        if algorithm == "shm" and not one_node:
            continue
        job = run.build(config.parse([*TINY, "--steps", "1", "--allreduce", algorithm]))
        assert job.grads.overlap is expected, (algorithm, job.overlap_reason)
        job.close()
    forced = run.build(config.parse([*TINY, "--steps", "1", "--allreduce", "auto", "--overlap"]))
    assert forced.grads.overlap and forced.overlap_reason == "on (--overlap)"
    forced.close()


@pytest.mark.mpi(min_size=2)
def test_a_non_finite_gradient_skips_the_step_on_every_rank():
    comm = MPI.COMM_WORLD
    job = run.build(config.parse([*TINY, "--steps", "10", "--overlap", "--max-bad-steps", "2"]))
    job.step()
    healthy = job.forward_model

    def poisoned(x, y):  # rank 1's loss (so its gradients, so the average) turn NaN
        logits, loss = healthy(x, y)
        return logits, loss * float("nan") if comm.rank == 1 else loss

    before = [p.detach().clone() for p in job.model.parameters()]
    job.forward_model = poisoned
    job.step()
    assert job.skipped_steps == 1 and job.step_index == 2  # the step counts, the update does not happen
    for a, b in zip(before, job.model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(UsageError, match="2 steps in a row .* non-finite gradient norm"):
        job.step()
    job.forward_model = healthy
    job.close()
