"""Training on CUDA: one bf16-autocast step against the same step in fp32, the gradient buckets
reduced on the communication thread's own CUDA stream, and the end-of-run MFU line. Skipped where
torch sees no GPU (the CPU versions of these paths run in ``tests/test_train.py`` and
``tests/test_engine.py``).

    timeout 600 .venv/bin/mpirun -np 2 .venv/bin/python -m pytest -q --with-mpi -m mpi tests/gpu
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch", allow_module_level=True)

from mpi4py import MPI  # noqa: E402

pytestmark = [pytest.mark.mpi(min_size=1)]

SMALL = ["--n-layer", "2", "--n-head", "4", "--n-embd", "128", "--block-size", "64", "--batch-size", "8",
         "--eval-batches", "1", "--device", "cuda"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small corpus every rank reads (rank 0's temporary directory)."""
    comm = MPI.COMM_WORLD
    root = Path(comm.bcast(str(tmp_path_factory.mktemp("gpu-train")) if comm.rank == 0 else None))
    if comm.rank == 0:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        (root / "corpus.txt").write_bytes((stdlib / "argparse.py").read_bytes() + (stdlib / "typing.py").read_bytes())
    comm.Barrier()
    return root, ["--data", str(root / "corpus.txt"), "--cache-dir", str(root / "cache")]


def test_bf16_autocast_step_is_close_to_fp32(data):
    """The same first step (same weights, same batch) under bf16 autocast and in fp32: the loss and
    the averaged gradient (fp32 buffers in both, --grad-clip 0 so nothing rescales it) agree."""
    from mpilm import config
    from mpilm.run import build

    root, corpus = data
    cfg = config.parse([*SMALL, *corpus, "--grad-clip", "0", "--steps", "1", "--out", str(root / "unused")])
    results = {}
    for precision in ("bf16", "fp32"):
        job = build(cfg)
        try:
            assert job.device.type == "cuda" and job.autocast is not None  # CUDA runs train in bf16 autocast
            if precision == "fp32":
                job.autocast = None
            loss = job.step()
            assert set(job.grads.flat) == {torch.float32}  # master weights and gradients stay fp32
            results[precision] = (loss.item(), job.grads.flat[torch.float32].detach().double().cpu())
        finally:
            job.close()
    (loss16, grad16), (loss32, grad32) = results["bf16"], results["fp32"]
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0).item()
    assert cosine > 0.99, cosine
    assert grad16.norm().item() == pytest.approx(grad32.norm().item(), rel=5e-2)


def test_overlapped_buckets_are_reduced_on_the_communication_stream():
    """With overlap every bucket's collective runs on the GradBuffer's own stream (ordered after
    backward by events), never on the compute stream; without overlap, on the compute stream."""
    from mpilm import models
    from mpilm.comm import collectives, compress, world
    from mpilm.comm.grad_sync import GradBuffer, broadcast_

    class StreamRecorder(compress.Compressor):
        def __init__(self):
            self.streams = []

        def allreduce_(self, bucket, key, comm, algorithm, step):
            self.streams.append(torch.cuda.current_stream(bucket.device).cuda_stream)
            super().allreduce_(bucket, key, comm, algorithm, step)

    comm = MPI.COMM_WORLD
    device = torch.device("cuda", world.local_rank() % torch.cuda.device_count())
    torch.cuda.set_device(device)
    compute_stream = torch.cuda.current_stream(device).cuda_stream
    for overlap in (True, False):
        torch.manual_seed(0)
        model = models.build("gpt", vocab_size=256, n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.0).to(device)
        broadcast_(model.parameters(), comm)
        grad_comm = comm.Dup()
        collectives.prepare(grad_comm)
        recorder = StreamRecorder().bind(grad_comm, "ring")
        grads = GradBuffer(model.named_parameters(), 4096, grad_comm, device, reducer=recorder, overlap=overlap)
        try:
            grads.begin_step(0)
            grads.arm(final=True)
            x = torch.randint(0, 256, (4, 32), device=device)
            model(x, x)[1].backward()
            grads.wait()
        finally:
            grads.close()
        assert len(recorder.streams) == len(grads.buckets) > 1
        if overlap:
            assert set(recorder.streams) == {grads._stream.cuda_stream} and compute_stream not in recorder.streams
        else:
            assert set(recorder.streams) == {compute_stream}


def test_run_reports_mfu_on_cuda(data, capsys):
    """A short CUDA run: summary.json's MFU is model FLOP/s over the bf16 peak of the device times
    the ranks, and the end-of-run throughput line prints it."""
    from mpilm import metrics, train

    root, corpus = data
    comm = MPI.COMM_WORLD
    summary = train.run([*SMALL, *corpus, "--steps", "6", "--log-every", "3", "--eval-every", "6",
                         "--out", str(root / "mfu")])
    name = torch.cuda.get_device_name(torch.cuda.current_device())
    peak = metrics.peak_flops(name)
    out = capsys.readouterr().out
    if peak is None:
        assert summary["mfu"] is None
        pytest.skip(f"{name}: not in mpilm.metrics.PEAK_BF16_FLOPS, so no MFU (add its bf16 dense peak)")
    assert summary["peak_flops_per_device"] == peak
    assert summary["mfu"] == pytest.approx(summary["model_flops_per_s"] / (peak * comm.size))
    assert 0 < summary["mfu"] < 1
    if comm.rank == 0:
        assert f"MFU {summary['mfu']:.1%}" in out


@pytest.mark.mpi(min_size=2)
def test_async_servers_and_workers_exchange_cuda_buffers(data):
    """--sync async on CUDA (every rank but the last serves a slice): the nonblocking slices, the
    fetch before an evaluation and the final broadcast go through host memory when MPI cannot read
    device memory; every rank ends with the same model, all of the budget taken."""
    from mpilm import checkpoint, train

    root, corpus = data
    comm = MPI.COMM_WORLD
    out = root / "async-cuda"
    summary = train.run([*SMALL, *corpus, "--sync", "async", "--ps-ranks", str(comm.size - 1), "--steps", "6",
                         "--log-every", "2", "--eval-every", "2", "--out", str(out)])
    assert summary["updates"] + summary["dropped_gradients"] == 6 and summary["ps_ranks"] == comm.size - 1
    digest = sum(float(v.double().sum()) for v in checkpoint.load(out / "model.pt")["model"].values())
    assert len(set(comm.allgather(digest))) == 1
