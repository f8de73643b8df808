"""Bad input through the real command line under mpirun: one `error:` line, exit 2, no hang.

And an unexpected exception on one rank: its traceback with a `[rank r]` prefix, and the whole
job aborted instead of the other ranks waiting forever in a collective.
"""

import json

import pytest
import torch

from conftest import run_cli

TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--steps", "3"]


def assert_usage_error(result, needle):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    (root / "empty_dir").mkdir()
    (root / "empty.txt").write_bytes(b"")
    (root / "small.txt").write_text("x" * 2000)  # 1980 training tokens: too few for 2 x 1025
    return root


@pytest.mark.parametrize("args, needle", [
    (["--data", "/nonexistent/corpus"], "--data /nonexistent/corpus: no such file or directory"),
    (["--batch-size", "0"], "--batch-size 0: must be > 0"),
    (["--steps", "-5"], "--steps -5: must be > 0"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--block-size", "0"], "--block-size 0: must be > 0"),
    (["--model", "transformerxl"], "--model transformerxl: expected one of"),
    (["--allreduce", "carrier-pigeon"], "--allreduce carrier-pigeon: expected one of"),
    (["--device", "tpu"], "--device tpu: expected one of"),
])
def test_bad_options(tmp_path, args, needle):
    assert_usage_error(run_cli(["-m", "mpilm.train", *TINY, "--out", str(tmp_path), *args], np=2, timeout=60), needle)


@pytest.mark.parametrize("name, extra, needle", [
    ("empty_dir", [], "no files to read"),
    ("empty.txt", [], "the corpus has no bytes"),
    ("small.txt", ["--block-size", "1024"], "corpus too small"),
])
def test_bad_corpora(corpora, tmp_path, name, extra, needle):
    args = ["-m", "mpilm.train", *TINY, "--data", str(corpora / name), "--cache-dir", str(tmp_path),
            "--out", str(tmp_path / "out"), *extra]
    assert_usage_error(run_cli(args, np=2, timeout=60), needle)


# Options added since the spine, one launch each for a representative value (every value and
# combination is checked in-process in tests/test_config.py, and fuzzed in tests/test_cli_fuzz.py).
@pytest.mark.parametrize("args, needle", [
    (["--compress", "zstd"], "--compress zstd: expected one of none, fp16, bf16, topk"),
    (["--compress", "topk", "--topk-ratio", "nan"], "--topk-ratio nan: must be a finite number"),
    (["--bucket-mb", "-1"], "--bucket-mb -1.0: must be > 0"),
    (["--zero", "1", "--compress", "topk"], "--zero 1 with --compress topk"),
    (["--zero", "1", "--allreduce", "tree"], "--zero 1 with --allreduce tree"),
    (["--max-bad-steps", "0"], "--max-bad-steps 0: must be > 0"),
])
def test_bad_options_added_since_the_spine(tmp_path, args, needle):
    assert_usage_error(run_cli(["-m", "mpilm.train", *TINY, "--out", str(tmp_path), *args], np=2, timeout=60), needle)


def test_ckpt_dir_that_is_a_regular_file(tmp_path):
    (tmp_path / "taken").write_text("not a directory\n")
    args = ["-m", "mpilm.train", *TINY, "--out", str(tmp_path / "out"), "--ckpt-every", "1",
            "--ckpt-dir", str(tmp_path / "taken")]
    assert_usage_error(run_cli(args, np=2, timeout=60), f"--ckpt-dir {tmp_path / 'taken'}: ")


# --steps 2 with a checkpoint after each step (both kept); the other options as every resumed run below
CKPT_RUN = [*TINY, "--steps", "2", "--batch-size", "4", "--eval-batches", "1", "--ckpt-every", "1", "--keep-ckpts", "0"]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A run started with --resume auto and nothing to resume (not an error: it starts at step 0),
    leaving step-1 and step-2 in <out>/ckpt; returns (launch result, checkpoint directory)."""
    out = tmp_path_factory.mktemp("checkpointed")
    result = run_cli(["-m", "mpilm.train", *CKPT_RUN, "--out", str(out), "--resume", "auto"], np=2, timeout=90)
    return result, out / "ckpt"


def test_resume_auto_with_nothing_to_resume_starts_at_step_0(checkpointed):
    result, ckpt = checkpointed
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"--resume auto: no complete checkpoint in {ckpt}: starting at step 0" in result.stdout
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-1", "step-2"]


def test_resume_from_the_last_checkpoint_finishes_without_a_step(checkpointed, tmp_path):
    """Resumed at --steps (a job killed after its last checkpoint): nothing to train, the run still
    evaluates, writes its summary and exits 0 (bench chaos hit this: the phase table had no step)."""
    _, ckpt = checkpointed
    done = run_cli(["-m", "mpilm.train", *CKPT_RUN, "--out", str(tmp_path), "--resume", str(ckpt / "step-2")],
                   np=2, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "phases: no step measured in this run" in done.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


@pytest.mark.parametrize("target, needle", [
    ("/nonexistent/step-4", "--resume /nonexistent/step-4: /nonexistent/step-4: no such checkpoint directory"),
    ("{tmp}", "has no readable manifest.json"),  # a directory, but not a checkpoint
])
def test_resume_from_what_is_not_a_checkpoint(tmp_path, target, needle):
    args = ["-m", "mpilm.train", *CKPT_RUN, "--out", str(tmp_path), "--resume", target.format(tmp=tmp_path)]
    assert_usage_error(run_cli(args, np=2, timeout=60), needle)


def test_resume_with_other_model_options_names_them(checkpointed, tmp_path):
    """Not torch's load_state_dict traceback: the options the checkpoint was written with."""
    _, ckpt = checkpointed
    args = ["-m", "mpilm.train", *CKPT_RUN, "--steps", "4", "--out", str(tmp_path), "--resume", str(ckpt / "step-2"),
            "--model", "lstm", "--n-embd", "32"]
    assert_usage_error(run_cli(args, np=2, timeout=60),
                       f"--resume {ckpt / 'step-2'}: written with other options: --model 'gpt' (this run: 'lstm'); "
                       "--n-embd 16 (this run: 32); resume with the options it was written with")


def truncated_copy(ckpt, tmp_path):
    """A copy of the checkpoints whose newest has half of rank 1's file."""
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    victim = copy / "step-2" / "rank-00001.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return copy


def test_resume_from_a_truncated_checkpoint_is_refused(checkpointed, tmp_path):
    copy = truncated_copy(checkpointed[1], tmp_path)
    args = ["-m", "mpilm.train", *CKPT_RUN, "--out", str(tmp_path / "out"), "--resume", str(copy / "step-2")]
    assert_usage_error(run_cli(args, np=2, timeout=60), "step-2 is corrupt (checksum mismatch in rank-00001.pt)")


def test_resume_auto_skips_a_truncated_checkpoint(checkpointed, tmp_path):
    copy = truncated_copy(checkpointed[1], tmp_path)
    args = ["-m", "mpilm.train", *CKPT_RUN, "--out", str(tmp_path / "out"), "--ckpt-dir", str(copy), "--resume", "auto"]
    result = run_cli(args, np=2, timeout=90)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert ("warning: --resume auto: checkpoint step-2 is corrupt (checksum mismatch in rank-00001.pt); trying the "
            "previous checkpoint") in result.stderr
    assert f"resumed from {copy / 'step-1'} at step 1" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(tmp_path):
    assert_usage_error(run_cli(["-m", "mpilm.train", *TINY, "--out", str(tmp_path), "--device", "cuda"], np=2, timeout=60),
                       "--device cuda: no CUDA GPU")


def test_help_prints_once():
    result = run_cli(["-m", "mpilm.train", "--help"], np=2, timeout=60)
    assert result.returncode == 0 and result.stdout.count("usage:") == 1
    assert "--allreduce" in result.stdout and "--grad-accum" in result.stdout


def test_exception_on_one_rank_aborts_the_job(tmp_path):
    script = (
        "import sys\n"
        "from mpi4py import MPI\n"
        "from mpilm import run, train\n"
        "if MPI.COMM_WORLD.rank == 1:\n"
        "    def broken_step(*args, **kwargs):\n"
        "        raise RuntimeError('injected failure on rank 1')\n"
        "    run.Run.step = broken_step\n"
        f"sys.exit(train.main({TINY + ['--out', str(tmp_path)]!r}))\n"
    )
    result = run_cli(["-c", script], np=2, timeout=90)
    assert result.returncode not in (0, 124, 137), "the job must abort, not hang or succeed"
    assert "[rank 1] Traceback" in result.stderr and "[rank 1] RuntimeError: injected failure on rank 1" in result.stderr


def test_ranks_launched_with_different_options_stop_with_one_error():
    """An MPMD launch (``A : B``) where the ranks disagree: every rank exits 2, one error names them."""
    import subprocess

    from conftest import BIN

    base = ["-m", "mpilm.train", *TINY, "--steps", "2"]
    cmd = [str(BIN / "mpirun"), "-np", "1", str(BIN / "python"), *base, "--lr", "1e-3", ":",
           "-np", "1", str(BIN / "python"), *base, "--lr", "2e-3"]
    result = subprocess.run(["timeout", "--kill-after=5", "120", *cmd], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: ranks disagree on their configuration: --lr (rank 0: 0.001; rank 1: 0.002); every rank "
                     "must run the same configuration (check the launch line, e.g. an MPMD ':' section)"], result.stderr


@pytest.mark.parametrize("where, waited_for", [
    ("run.Run.step", "gradient bucket"),             # rank 0 waits in a bucket's allreduce (comm thread or main)
    ("train.mean_over_ranks", "the log line's loss average"),  # ... in the main thread's log-line average
])
def test_a_stopped_rank_ends_the_job_within_the_comm_timeout(tmp_path, where, waited_for):
    """SIGSTOP on rank 1 (a stalled node): rank 0's watchdog names its wait and the silent peer, and aborts the job."""
    import time

    script = (
        "import os, signal, sys\n"
        "from mpi4py import MPI\n"
        "from mpilm import run, train\n"
        f"original = {where}\n"
        "calls = []\n"
        "def stalling(*args):\n"
        "    calls.append(1)\n"
        "    if MPI.COMM_WORLD.rank == 1 and len(calls) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGSTOP)\n"
        "    return original(*args)\n"
        f"{where} = stalling\n"
        f"sys.exit(train.main({TINY + ['--steps', '6', '--log-every', '1', '--comm-timeout', '4', '--out', str(tmp_path)]!r}))\n"
    )
    t0 = time.monotonic()
    result = run_cli(["-c", script], np=2, timeout=60)
    assert result.returncode not in (0, 124, 137), "the job must end by itself, not by the outer timeout"
    assert time.monotonic() - t0 < 4 + 45  # start-up included: slow on a loaded machine
    assert "[rank 0] error: stalled for" in result.stderr and waited_for in result.stderr, result.stderr
    assert "no answer within 3 s from rank 1 (node " in result.stderr, result.stderr  # the stopped peer, named


def test_sigterm_checkpoints_at_a_step_boundary_and_exits_75(tmp_path):
    """Pre-emption: a SIGTERM to one rank stops every rank at the same step, with a checkpoint."""
    script = (
        "import os, signal, sys\n"
        "from mpi4py import MPI\n"
        "from mpilm import run, train\n"
        "step = run.Run.step\n"
        "def signalled(self):\n"
        "    if MPI.COMM_WORLD.rank == 1 and self.step_index == 3:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return step(self)\n"
        "run.Run.step = signalled\n"
        f"sys.exit(train.main({TINY + ['--steps', '8', '--out', str(tmp_path)]!r}))\n"
    )
    result = run_cli(["-c", script], np=2, timeout=90)
    assert result.returncode == 75, result.stderr
    assert "pre-empted by a signal at step 4" in result.stderr, result.stderr
    assert (tmp_path / "ckpt" / "step-4" / "DONE").is_file()
    again = run_cli(["-m", "mpilm.train", *TINY, "--steps", "8", "--out", str(tmp_path), "--resume", "auto"], np=2,
                    timeout=90)
    assert again.returncode == 0 and "resumed from" in again.stdout and "at step 4" in again.stdout, again.stderr
