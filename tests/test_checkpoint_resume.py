"""Training checkpoints: complete-or-absent directories, verified resume, bit-exact continuation."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from mpi4py import MPI

from mpilm import checkpoint, train
from mpilm.errors import UsageError

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--log-every", "2", "--eval-every", "100", "--eval-batches", "1", "--bucket-mb", "0.01"]


def shared_tmp(tmp_path_factory, name):
    comm = MPI.COMM_WORLD
    return Path(comm.bcast(str(tmp_path_factory.mktemp(name)) if comm.rank == 0 else None))


def final_model(out: Path) -> dict:
    return checkpoint.load(out / "model.pt")["model"]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("extra", [["--allreduce", "ring", "--overlap"], ["--zero", "1"],
                                   ["--compress", "topk", "--topk-ratio", "0.1", "--allreduce", "rhd"],
                                   ["--compress", "fp16", "--grad-accum", "2", "--dropout", "0.1"],
                                   # AdamW's top-k variants keep per-rank Adam moments in the compressor;
                                   # frozen is resumed after its freeze (step 6), from step-8
                                   ["--compress", "topk", "--topk-ratio", "0.05"],
                                   ["--compress", "topk", "--topk-ratio", "0.05", "--topk-adam", "frozen",
                                    "--topk-adam-warmup", "6"],
                                   # sign: residuals and both Adam moments in the compressor
                                   ["--compress", "sign", "--sign-chunk", "256"]])
def test_resume_from_a_checkpoint_is_bit_identical_to_the_uninterrupted_run(tmp_path_factory, extra):
    comm = MPI.COMM_WORLD
    root = shared_tmp(tmp_path_factory, "resume")
    straight = root / "straight"
    train.run([*TINY, "--steps", "10", "--ckpt-every", "4", "--keep-ckpts", "2", "--out", str(straight), *extra])
    done = checkpoint.complete_checkpoints(straight / "ckpt")
    assert [p.name for p in done] == ["step-4", "step-8"]  # step-0 never, the oldest beyond --keep-ckpts gone
    # "killed after step 8": a new job with the same options resumes from the newest checkpoint
    again = root / "again"
    if comm.rank == 0:
        again.mkdir()
        shutil.copytree(straight / "ckpt", again / "ckpt")
        shutil.copy(straight / "metrics.jsonl", again / "metrics.jsonl")
    comm.Barrier()
    train.run([*TINY, "--steps", "10", "--ckpt-every", "4", "--out", str(again), "--resume", "auto", *extra])
    if comm.rank == 0:
        a, b = final_model(straight), final_model(again)
        for name in a:
            assert torch.equal(a[name], b[name]), name
        steps = [json.loads(line)["step"] for line in (again / "metrics.jsonl").read_text().splitlines()]
        assert steps == [2, 4, 6, 8, 10]  # continued, not restarted
        manifest = json.loads((done[-1] / checkpoint.MANIFEST).read_text())
        assert set(manifest["files"]) == {"meta.json", *(checkpoint.rank_file(r) for r in range(comm.size))}


@pytest.mark.mpi(min_size=2)
def test_corrupt_checkpoints_are_refused_or_skipped(tmp_path_factory, capfd):
    comm = MPI.COMM_WORLD
    root = shared_tmp(tmp_path_factory, "corrupt")
    out = root / "run"
    train.run([*TINY, "--steps", "4", "--ckpt-every", "2", "--out", str(out)])
    newest = out / "ckpt" / "step-4"
    if comm.rank == 0:
        victim = newest / checkpoint.rank_file(1)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in rank 1's state
        victim.write_bytes(bytes(data))
    comm.Barrier()
    with pytest.raises(UsageError, match=r"step-4 is corrupt \(checksum mismatch in rank-00001.pt\)"):
        train.run([*TINY, "--steps", "4", "--out", str(root / "x"), "--resume", str(newest)])
    # auto skips it and says so, then resumes from step 2
    summary = train.run([*TINY, "--steps", "4", "--out", str(out), "--resume", "auto"])
    assert summary["steps"] == 4
    if comm.rank == 0:
        assert "step-4 is corrupt" in capfd.readouterr().err
    with pytest.raises(UsageError, match="no such checkpoint directory"):
        train.run([*TINY, "--steps", "4", "--out", str(root / "y"), "--resume", str(root / "nowhere")])


def test_a_crash_mid_write_leaves_no_checkpoint_under_its_name(tmp_path):
    comm = MPI.COMM_SELF
    writer = checkpoint.Writer(tmp_path, comm, keep=0)
    writer.begin(3, {"x": torch.ones(3)}, {"step": 3})
    writer._thread.join()
    # the process dies here: the files exist only under the temporary name
    assert checkpoint.complete_checkpoints(tmp_path) == [] and (tmp_path / ".step-3.tmp").is_dir()
    assert writer.finish() == tmp_path / "step-3"
    assert checkpoint.complete_checkpoints(tmp_path) == [tmp_path / "step-3"]
    assert checkpoint.verify(tmp_path / "step-3", 0) is None


@pytest.mark.parametrize("resume_np, extra, ok", [
    (3, [], True),                                      # more ranks: ranks 2.. take a copy of rank 0's state
    (1, ["--compress", "fp16"], True),                  # fewer ranks; a stateless compressor
    (3, ["--zero", "1"], False),                        # sharded optimizer state (residuals: test_engine.py)
])
def test_resume_at_another_world_size(tmp_path, resume_np, extra, ok):
    """Synchronous state is the same on every rank, so it continues at any world size, with a notice;
    per-rank state (ZeRO-1 shards, error-feedback residuals) is refused with one error line."""
    from conftest import run_cli

    args = ["-m", "mpilm.train", *TINY, "--steps", "6", "--ckpt-every", "3", "--out", str(tmp_path), *extra]
    first = run_cli(args, np=2, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli([*args, "--steps", "8", "--resume", "auto"], np=resume_np, timeout=120)
    if ok:
        assert again.returncode == 0, again.stderr[-2000:]
        assert f"notice: the checkpoint was written by 2 rank(s), this job has {resume_np}" in again.stdout
        assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == resume_np
    else:
        assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-2000:]
        errors = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "written by 2 ranks and this job has" in errors[0] and \
            "resume with 2 ranks" in errors[0], again.stderr[-2000:]
