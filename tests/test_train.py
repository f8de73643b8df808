"""Training, distributed: data-parallel equivalence, falling loss, and what a run leaves behind."""

import json
from pathlib import Path

import pytest
import torch
from mpi4py import MPI

from mpilm import checkpoint, models, optim, train
from mpilm.comm import compress
from mpilm.comm.grad_sync import GradBuffer, broadcast_
from mpilm.errors import UsageError

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--log-every", "5", "--eval-batches", "4"]


def shared_tmp(tmp_path_factory, name):
    comm = MPI.COMM_WORLD
    return comm.bcast(str(tmp_path_factory.mktemp(name)) if comm.rank == 0 else None)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return models.build("gpt", vocab_size=256, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("accum", [1, 2])
def test_data_parallel_equals_one_process_with_the_global_batch(accum):
    """N ranks x batch B (x accum) == 1 process x batch N*B*accum, after 5 SGD steps (fp32, CPU)."""
    comm = MPI.COMM_WORLD
    n, r, B, T = comm.size, comm.rank, 3, 16
    g = torch.Generator().manual_seed(42)
    batches = [torch.randint(0, 256, (n * accum * B, T + 1), generator=g) for _ in range(5)]

    def run(model, grad_comm, rows_of):
        reducer = compress.Compressor().bind(grad_comm, "mpi")
        grads = GradBuffer(model.named_parameters(), 2048, grad_comm, reducer=reducer, overlap=True)  # many buckets
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        micro_steps = accum if grad_comm is comm else 1
        for step, batch in enumerate(batches):
            grads.begin_step(step)
            for micro in range(micro_steps):
                grads.arm(final=micro == micro_steps - 1)
                rows = batch[rows_of(micro)]
                (model(rows[:, :-1], rows[:, 1:])[1] / micro_steps).backward()
            grads.wait()
            optim.clip_(list(grads.flat.values()), 1.0)
            opt.step()
        grads.close()
        return model

    dp = run(tiny_gpt(), comm, lambda m: slice((r * accum + m) * B, (r * accum + m + 1) * B))
    ref = run(tiny_gpt(), MPI.COMM_SELF, lambda m: slice(None))
    assert len(GradBuffer(tiny_gpt().named_parameters(), 2048, MPI.COMM_SELF).buckets) > 3
    for (name, a), b in zip(dp.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


@pytest.mark.mpi(min_size=2)
def test_grads_are_views_and_broadcast_equalises_parameters():
    comm = MPI.COMM_WORLD
    model = tiny_gpt(seed=comm.rank)  # deliberately different on each rank
    broadcast_(model.parameters(), comm)
    first = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    root = first.clone()
    comm.Bcast(root.numpy(), root=0)
    assert torch.equal(first, root)
    grads = GradBuffer(model.named_parameters(), 4096, comm)
    flat = grads.flat[torch.float32]
    lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * 4
    for p in model.parameters():
        assert lo <= p.grad.data_ptr() < hi
    model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))[1].backward()
    grads.check_views()
    assert flat.abs().sum() > 0
    starts = [b.start for b in grads.buckets]
    assert starts == sorted(starts) and grads.buckets[-1].stop == flat.numel()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("model", ["gpt", "lstm"])
def test_loss_falls_and_outputs_are_written(tmp_path_factory, model):
    out = shared_tmp(tmp_path_factory, f"run-{model}")
    summary = train.run([*TINY, "--model", model, "--steps", "40", "--lr", "3e-3", "--eval-every", "20",
                         "--out", out, "--sample", "20" if model == "gpt" else "0"])
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 1.0, summary
    if MPI.COMM_WORLD.rank != 0:
        return
    files = {p.name for p in Path(out).iterdir()}
    assert {"config.json", "metrics.jsonl", "summary.json", "model.pt"} <= files
    written = json.loads((Path(out) / "summary.json").read_text())
    for key in ("final_train_loss", "final_val_loss", "val_bits_per_byte", "steps", "world_size",
                "tokens_per_s", "compute_s", "comm_s"):
        assert key in written
    assert written["world_size"] == MPI.COMM_WORLD.size and written["steps"] == 40
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [5, 10, 15, 20, 25, 30, 35, 40]
    for key in ("loss", "lr", "tokens_per_s", "data_s", "forward_s", "backward_s", "comm_s", "optimizer_s"):
        assert all(key in row for row in rows)
    state = checkpoint.load(Path(out) / "model.pt")
    assert state["config"]["model"] == model and "model" in state


@pytest.mark.mpi(min_size=2)
def test_mpiio_run_and_grad_accum(tmp_path_factory):
    out = shared_tmp(tmp_path_factory, "run-mpiio")
    summary = train.run([*TINY, "--steps", "10", "--data-io", "mpiio", "--grad-accum", "2", "--optimizer", "sgd",
                         "--lr", "0.05", "--out", out])
    assert summary["steps"] == 10 and summary["final_val_loss"] < summary["initial_val_loss"]


def loss_curve(tmp_path_factory, name, args):
    """Rank-averaged loss of each of 20 steps (on rank 0; None elsewhere)."""
    out = shared_tmp(tmp_path_factory, name)
    train.run([*TINY, "--steps", "20", "--log-every", "1", "--eval-every", "20", "--eval-batches", "1",
               "--bucket-mb", "0.01", "--out", out, *args])
    if MPI.COMM_WORLD.rank == 0:
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        return torch.tensor([row["loss"] for row in rows])
    return None


@pytest.mark.mpi(min_size=2)
def test_every_allreduce_algorithm_gives_the_same_loss_curve(tmp_path_factory, monkeypatch):
    """20 steps with each --allreduce: the logged (rank-averaged) losses agree to fp tolerance."""
    from mpilm import config
    from mpilm.comm import world

    curves = {}
    one_node = world.local_size() == MPI.COMM_WORLD.size
    for algorithm in config.ALLREDUCE_ALGORITHMS:
        if algorithm == "shm" and not one_node:
            with pytest.raises(UsageError, match="use --allreduce hier"):
                train.run([*TINY, "--steps", "1", "--allreduce", "shm"])
            continue
        curves[algorithm] = loss_curve(tmp_path_factory, f"algo-{algorithm}", ["--allreduce", algorithm])
    # hier again over fake nodes of one rank each, so its between-node stage runs at any -np
    monkeypatch.setenv("MPILM_RANKS_PER_NODE", "1")
    curves["hier, 1-rank nodes"] = loss_curve(tmp_path_factory, "algo-hier-nodes", ["--allreduce", "hier"])
    if MPI.COMM_WORLD.rank == 0:
        for algorithm, curve in curves.items():
            assert len(curve) == 20
            torch.testing.assert_close(curve, curves["mpi"], atol=2e-4, rtol=0, msg=algorithm)


@pytest.mark.mpi(min_size=2)
def test_compression_in_training_counts_the_bytes_it_saves(tmp_path_factory):
    """fp16 halves the measured bytes per step; top-k at 2% sends far fewer; all still learn."""
    runs = {}
    for name, extra in [("none", []), ("fp16", ["--compress", "fp16"]), ("bf16", ["--compress", "bf16"]),
                        ("topk", ["--compress", "topk", "--topk-ratio", "0.02", "--topk-adam-warmup", "0"]),
                        ("gtopk-dgc", ["--compress", "topk", "--topk-ratio", "0.02", "--topk-aggregate", "gtopk",
                                       "--optimizer", "sgd", "--lr", "0.1", "--momentum-correction",
                                       "--local-clip", "1.0", "--topk-warmup-steps", "5"])]:
        out = shared_tmp(tmp_path_factory, f"compress-{name}")
        runs[name] = train.run([*TINY, "--steps", "10", "--eval-every", "10", "--allreduce", "ring",
                                "--out", out, *extra])
    sent = {name: summary["bytes_sent_per_step"] for name, summary in runs.items()}
    assert sent["none"] > 0
    assert sent["fp16"] == pytest.approx(sent["none"] / 2, rel=0.01) and sent["bf16"] == sent["fp16"]
    assert sent["topk"] < sent["none"] / 5 and sent["gtopk-dgc"] < sent["none"] / 2
    for name, summary in runs.items():
        assert summary["final_val_loss"] < summary["initial_val_loss"], name
        assert summary["phases"]["compress_total"]["mean"] > 0 or name == "none", name


@pytest.mark.mpi(min_size=2)
def test_shared_memory_gradients_are_views_and_average_correctly():
    from mpilm.comm import shm

    comm = MPI.COMM_WORLD
    before = shm.live_windows()
    model = tiny_gpt()
    grads = GradBuffer(model.named_parameters(), 4096, comm, shared_memory=True)
    assert shm.live_windows() > before, "the flat buffer lives in a shared window"
    flat = grads.flat[torch.float32]
    for p in model.parameters():
        assert flat.data_ptr() <= p.grad.data_ptr() < flat.data_ptr() + flat.numel() * 4
    for algorithm in ("shm", "hier", "ring", "auto"):
        grads.reducer = compress.Compressor().bind(comm, algorithm)
        grads.begin_step(0)
        flat.copy_(torch.arange(flat.numel(), dtype=torch.float32) * (comm.rank + 1))
        grads.wait()  # no backward ran: every bucket is released and reduced here
        expected = torch.arange(flat.numel(), dtype=torch.float32) * (comm.size + 1) / 2
        torch.testing.assert_close(flat, expected, msg=algorithm)
