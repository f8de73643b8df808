"""--sync local|diloco: the equivalences that pin them down, bit-exact resume, and their usage errors."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from mpi4py import MPI

from mpilm import checkpoint, config, train
from mpilm.errors import UsageError

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--log-every", "2", "--eval-every", "100", "--eval-batches", "1", "--bucket-mb", "0.01", "--grad-clip", "0"]
PLAIN_SGD = ["--optimizer", "sgd", "--momentum", "0", "--lr", "0.05", "--warmup-steps", "0"]


def shared_tmp(tmp_path_factory, name):
    comm = MPI.COMM_WORLD
    return Path(comm.bcast(str(tmp_path_factory.mktemp(name)) if comm.rank == 0 else None))


def final_params(root: Path, name: str, args: list[str]) -> dict:
    train.run([*TINY, "--out", str(root / name), *args])
    return checkpoint.load(root / name / "model.pt")["model"]


def assert_close(a: dict, b: dict, tol: float):
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=tol, atol=tol), (name, (a[name] - b[name]).abs().max())


@pytest.mark.mpi(min_size=2)
def test_local_sgd_with_one_step_equals_sync_and_diloco_with_one_plain_outer_step_equals_local(tmp_path_factory):
    root = shared_tmp(tmp_path_factory, "modes")
    steps = ["--steps", "6"]
    sync = final_params(root, "sync", [*steps, *PLAIN_SGD])
    local = final_params(root, "local", [*steps, *PLAIN_SGD, "--sync", "local", "--local-steps", "1"])
    assert_close(sync, local, 1e-5)  # avg(p - lr g_r) == p - lr avg(g_r), up to rounding
    # the inner optimizer is AdamW here: diloco with H=1, outer lr 1, no momentum is local SGD with H=1
    local_adam = final_params(root, "local_adam", [*steps, "--sync", "local", "--local-steps", "1"])
    diloco = final_params(root, "diloco", [*steps, "--sync", "diloco", "--local-steps", "1", "--outer-lr", "1",
                                          "--outer-momentum", "0"])
    assert_close(local_adam, diloco, 1e-5)
    # and H > 1 really lets the ranks drift apart between exchanges (not a disguised sync)
    assert not all(torch.equal(sync[k], final_params(root, "local4", [*steps, *PLAIN_SGD, "--sync", "local",
                                                                       "--local-steps", "4"])[k]) for k in sync)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("extra", [["--sync", "local", "--local-steps", "3", "--local-average-optimizer"],
                                   ["--sync", "diloco", "--local-steps", "3", "--compress", "topk",
                                    "--topk-ratio", "0.1"]])
def test_local_modes_resume_bit_identically(tmp_path_factory, extra):
    comm = MPI.COMM_WORLD
    root = shared_tmp(tmp_path_factory, "resume-modes")
    straight = root / "straight"
    train.run([*TINY, "--steps", "10", "--ckpt-every", "4", "--out", str(straight), *extra])
    again = root / "again"
    if comm.rank == 0:
        again.mkdir()
        shutil.copytree(straight / "ckpt", again / "ckpt")
        shutil.rmtree(again / "ckpt" / "step-8")  # "killed between step 4 and step 8"
    comm.Barrier()
    summary = train.run([*TINY, "--steps", "10", "--ckpt-every", "4", "--out", str(again), "--resume", "auto", *extra])
    assert summary["sync"] == extra[1]
    if comm.rank == 0:
        a, b = (checkpoint.load(p / "model.pt")["model"] for p in (straight, again))
        for name in a:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("args, needle", [
    (["--local-steps", "0"], "--local-steps 0: must be > 0"),
    (["--sync", "async-ish"], "--sync async-ish: expected one of sync, async, local, diloco"),
    (["--max-staleness", "3"], "--max-staleness applies only with --sync async"),
    (["--sync", "local", "--staleness-lr"], "--staleness-lr applies only with --sync async"),
    (["--sync", "async", "--max-staleness", "-2"], "--max-staleness -2: must be >= -1"),
    (["--sync", "async", "--compress", "bf16"], "--sync async with --compress bf16"),
    (["--ps-ranks", "2"], "--ps-ranks applies only with --sync async"),
    (["--sync", "local", "--async-pipeline"], "--async-pipeline applies only with --sync async"),
    (["--sync", "async", "--ps-ranks", "0"], "--ps-ranks 0: must be > 0"),
    (["--slow-factor", "0.5"], "--slow-factor 0.5: must be >= 1"),
    (["--slow-rank", "-3"], "--slow-rank -3: must be >= -1"),
    (["--outer-lr", "0.5"], "--outer-lr applies only with --sync diloco (this run has --sync sync)"),
    (["--sync", "local", "--outer-momentum", "0.5"], "--outer-momentum applies only with --sync diloco"),
    (["--local-steps", "8"], "--local-steps applies only with --sync local or diloco"),
    (["--sync", "diloco", "--local-average-optimizer"], "--local-average-optimizer applies only with --sync local"),
    (["--sync", "local", "--zero", "1"], "--sync local with --zero 1"),
    (["--sync", "diloco", "--overlap"], "--sync diloco with --overlap"),
    (["--sync", "local", "--compress", "fp16"], "--sync local with --compress fp16"),
    (["--sync", "diloco", "--outer-momentum", "1"], "--outer-momentum 1.0: must be in [0, 1)"),
])
def test_mode_options_are_checked(args, needle):
    with pytest.raises(UsageError) as err:
        config.parse(args)
    assert needle in str(err.value)


def test_the_mode_names_match_the_modes_package():
    from mpilm import modes

    assert config.SYNC_MODES == modes.MODES


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("pipelined", [False, True])
def test_async_with_one_worker_equals_sequential_sgd_on_the_same_batches(tmp_path_factory, pipelined):
    """One worker: the servers apply the worker's gradients one by one, so the result is
    single-process training on the worker's batches, bit for bit: at max staleness 0, or, with
    --async-pipeline, each gradient computed at the parameters one update old (staleness 1 after
    the first). Every rank but the last serves (--ps-ranks N-1): at np 3 and more the parameters
    are sliced over several servers, each clipping its slice by the worker's norm of the whole
    gradient."""
    from mpilm import optim, run

    comm = MPI.COMM_WORLD
    servers = comm.size - 1
    root = shared_tmp(tmp_path_factory, f"async1-{pipelined}")
    args = [*TINY, "--steps", "6", "--grad-clip", "0.05"]  # a clip that bites
    served_args = [*args, "--sync", "async", "--ps-ranks", str(servers), "--out", str(root / "async"),
                   *(["--async-pipeline"] if pipelined else ["--max-staleness", "0"])]
    job = run.build(config.parse(served_args))
    summary = train.run(served_args)
    assert summary["updates"] == 6 and summary["staleness_histogram"] == ({"0": 1, "1": 5} if pipelined else {"0": 6})
    assert summary["ps_ranks"] == servers and len(summary["server_busy_shares"]) == servers
    served = checkpoint.load(root / "async" / "model.pt")["model"]
    # the reference: this rank alone, on the worker's block and batches (every rank builds one: start-up is collective)
    ref = run.build(config.parse([*args, "--out", str(root / "ref")]), MPI.COMM_SELF, corpus=job.corpus)
    ref.data_rank = servers
    flats = list(ref.grads.flat_params.values())
    held = [f.clone() for f in flats]  # what a pipelined worker computes with: the parameters one update old
    for t in range(6):
        current = [f.clone() for f in flats]
        for flat, old in zip(flats, held if pipelined else current):
            flat.copy_(old)
        ref.compute_gradients(t)
        for flat, keep in zip(flats, current):
            flat.copy_(keep)
        ref.apply_gradients(optim.lr_at(t, ref.cfg.lr, ref.cfg.steps, ref.cfg.warmup_steps, ref.cfg.min_lr_ratio))
        held = current
    if comm.rank == servers:  # the worker's corpus block is its own
        for name, p in ref.model.state_dict().items():
            assert torch.equal(p, served[name]), name
    job.close()
    ref.close()


@pytest.mark.mpi(min_size=2)
def test_async_ends_with_the_servers_model_on_every_rank_and_resumes_from_its_checkpoints(tmp_path_factory):
    comm = MPI.COMM_WORLD
    root = shared_tmp(tmp_path_factory, "async-resume")
    args = [*TINY, "--sync", "async", "--steps", "8", "--ckpt-every", "4"]
    straight = root / "straight"
    summary = train.run([*args, "--out", str(straight)])
    workers = comm.size - 1
    # the budget is 8 gradients in all, from whichever workers sent them
    assert summary["updates"] + summary["dropped_gradients"] == 8
    assert sum(summary["staleness_histogram"].values()) == 8 == sum(summary["gradients_per_worker"].values())
    assert 0 <= summary["server_busy_share"] <= 1
    digest = sum(float(v.double().sum()) for v in checkpoint.load(straight / "model.pt")["model"].values())
    assert len(set(comm.allgather(digest))) == 1
    assert checkpoint.complete_checkpoints(straight / "ckpt")  # pauses of the server's loop were checkpointed
    if workers == 1:  # one worker: deterministic, so the resumed run must match bit for bit
        again = root / "again"
        if comm.rank == 0:
            again.mkdir()
            shutil.copytree(straight / "ckpt" / "step-4", again / "ckpt" / "step-4")
        comm.Barrier()
        train.run([*args, "--out", str(again), "--resume", "auto"])
        if comm.rank == 0:
            a, b = (checkpoint.load(p / "model.pt")["model"] for p in (straight, again))
            for name in a:
                assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("np, extra, needle", [
    (1, [], "error: --sync async needs at least 2 ranks"),
    (2, ["--ps-ranks", "2"], "error: --ps-ranks 2 with 2 ranks leaves no worker: at most 1 servers"),
])
def test_async_needs_a_worker(tmp_path, np, extra, needle):
    from conftest import run_cli

    done = run_cli(["-m", "mpilm.train", *TINY, "--sync", "async", *extra, "--out", str(tmp_path)], np=np, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert needle in done.stderr, done.stderr[-2000:]


def signal_at_step_3(args: list[str], rank: int, signal_name: str, where: str = "worker") -> str:
    """A ``python -c`` script: mpilm.train with ``args``, where ``rank`` sends itself ``signal_name``
    as it starts computing its gradient of step 3 (``where="worker"``) or, an async server, as it
    takes its fourth gradient (``where="server"``)."""
    target, condition = {"worker": ("run.Run.compute_gradients", "args[0] == 3"),
                         "server": ("async_ps.AsyncSGD._take", "self.taken == 3")}[where]
    return (
        "import os, signal, sys\n"
        "from mpi4py import MPI\n"
        "from mpilm import run, train\n"
        "from mpilm.modes import async_ps\n"
        f"original = {target}\n"
        "def signalled(self, *args):\n"
        f"    if MPI.COMM_WORLD.rank == {rank} and {condition}:\n"
        f"        os.kill(os.getpid(), signal.{signal_name})\n"
        "    return original(self, *args)\n"
        f"{target} = signalled\n"
        f"sys.exit(train.main({args!r}))\n"
    )


def test_async_preemption_checkpoints_at_a_pause_and_resumes(tmp_path):
    """SIGTERM to a worker: it reports the signal in its next gradient's header, the server pauses
    every worker, all ranks checkpoint and exit 75; --resume auto finishes the run."""
    from conftest import run_cli

    args = [*TINY, "--sync", "async", "--steps", "12", "--out", str(tmp_path)]
    first = run_cli(["-c", signal_at_step_3(args, rank=1, signal_name="SIGTERM")], np=2, timeout=120)
    assert first.returncode == 75, first.stderr[-2000:]
    assert "pre-empted by a signal" in first.stderr and checkpoint.complete_checkpoints(tmp_path / "ckpt")
    again = run_cli(["-m", "mpilm.train", *args, "--resume", "auto"], np=2, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "summary.json").read_text())["updates"] == 12


@pytest.mark.mpi(min_size=3)
def test_async_staleness_bound_drops_exactly_the_staler_gradients(tmp_path_factory):
    """--max-staleness 0 with two or more workers: every gradient with staleness above the bound is
    dropped and counted, every other one applied; the budget counts both."""
    root = shared_tmp(tmp_path_factory, "async-stale")
    summary = train.run([*TINY, "--sync", "async", "--steps", "12", "--max-staleness", "0", "--slow-rank", "1",
                         "--slow-factor", "3", "--out", str(root)])
    histogram = {int(k): v for k, v in summary["staleness_histogram"].items()}
    assert sum(histogram.values()) == 12
    assert summary["dropped_gradients"] == sum(v for k, v in histogram.items() if k > 0)
    assert summary["updates"] == histogram.get(0, 0) == 12 - summary["dropped_gradients"]
    # the fast worker contributes more than the straggler, rank 1, slowed 3x
    per_worker = {int(k): v for k, v in summary["gradients_per_worker"].items()}
    assert per_worker.get(2, 0) > per_worker.get(1, 0)


@pytest.mark.parametrize("pipelined", [False, True])
def test_two_servers_evaluate_checkpoint_relay_a_servers_signal_and_resume(tmp_path, pipelined):
    """--ps-ranks 2 at np 4 (two servers, two workers): evaluations fetch the other server's slice
    (one of them waits for a checkpoint's pause); SIGTERM to the second server reaches the lead
    through a worker, every rank checkpoints and exits 75; --resume auto finishes the budget; a
    resume with another --ps-ranks is refused (each server's optimizer state is its own slice's).
    Pipelined, a worker drains the gradient still in flight before it pauses or stops.
    The fetches and the relay are timing-dependent: this run shows they end and agree, not their order."""
    from conftest import run_cli

    args = [*TINY, "--sync", "async", "--ps-ranks", "2", "--steps", "16", "--ckpt-every", "4", "--eval-every", "2",
            "--out", str(tmp_path), *(["--async-pipeline"] if pipelined else [])]
    first = run_cli(["-c", signal_at_step_3(args, rank=1, signal_name="SIGTERM", where="server")], np=4, timeout=180)
    assert first.returncode == 75, first.stderr[-2000:]
    assert "pre-empted by a signal" in first.stderr and checkpoint.complete_checkpoints(tmp_path / "ckpt")
    again = run_cli(["-m", "mpilm.train", *args, "--resume", "auto"], np=4, timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["updates"] + summary["dropped_gradients"] == 16 and summary["ps_ranks"] == 2
    assert math.isfinite(summary["final_train_loss"])  # every server keeps the losses it saw
    assert sum(summary["gradients_per_worker"].values()) == 16 and set(summary["gradients_per_worker"]) <= {"2", "3"}
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # every record in order; an evaluation due while a pause gathers is taken at the pause, at its version
    assert set(range(2, 17, 2)) <= {r["step"] for r in logged}
    evaluated = [r["step"] for r in logged if "val_loss" in r]
    assert evaluated == sorted(set(evaluated)) and evaluated[0] == 2 and evaluated[-1] == 16
    other = run_cli(["-m", "mpilm.train", *args, "--ps-ranks", "1", "--resume", "auto"], np=4, timeout=180)
    assert other.returncode == 2 and "--ps-ranks 2 (this run: 1)" in other.stderr, other.stderr[-2000:]


def test_async_shuts_down_cleanly_at_np_4(tmp_path):
    """Three workers: the server stops each after the budget, every rank ends with its model, exit 0."""
    from conftest import run_cli

    done = run_cli(["-m", "mpilm.train", *TINY, "--sync", "async", "--steps", "9", "--out", str(tmp_path)],
                   np=4, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["updates"] == 9 and sum(summary["gradients_per_worker"].values()) == 9
    assert set(summary["gradients_per_worker"]) <= {"1", "2", "3"}


def test_async_a_dead_worker_ends_the_job_within_seconds(tmp_path):
    """A worker killed (SIGKILL) mid-run: the launcher takes the job down, nothing waits forever."""
    import time

    from conftest import run_cli

    args = [*TINY, "--sync", "async", "--steps", "400", "--out", str(tmp_path)]
    t0 = time.monotonic()
    done = run_cli(["-c", signal_at_step_3(args, rank=2, signal_name="SIGKILL")], np=3, timeout=120)
    assert done.returncode not in (0, 124), (done.returncode, done.stderr[-2000:])
    assert time.monotonic() - t0 < 90
    assert not (tmp_path / "summary.json").exists()
