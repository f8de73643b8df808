"""Out dir not writable, disk full mid-checkpoint: one `error:` line, exit 2 on every rank, and the
earlier checkpoints left complete. The disk really fills: a small tmpfs is mounted per test.

We run as root in CI, where permission bits stop nothing, so "not writable" is a tmpfs remounted
read-only (EROFS stops root too) and a path under a regular file (ENOTDIR, no root needed).
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch
from mpi4py import MPI

from conftest import run_cli
from mpilm import checkpoint
from mpilm.errors import UsageError
from test_cli_errors import assert_usage_error

pytestmark = pytest.mark.system  # make test-system (Makefile)

TINY = ["-m", "mpilm.train", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
        "--eval-every", "100", "--eval-batches", "1"]
# sizes measured with TINY at 2 ranks (torch 2.13): a checkpoint is 2 x 132 kB rank files plus
# meta/manifest/DONE, ~282 kB in 4 kB tmpfs pages; model.pt 35 kB; a metrics line ~450 bytes
TWO_CHECKPOINTS = "700k"


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size) -> Path``: a fresh tmpfs of ``size`` bytes (mount's syntax: 700k, 8m), unmounted
    after the test whatever happens; the test is skipped when mounting is not possible here."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        where = tmp_path / f"tmpfs-{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        if subprocess.run(["umount", str(where)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(where)])  # still busy (a leftover process): detach it


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def error_line(result) -> str:
    return next(line for line in result.stderr.splitlines() if line.startswith("error: "))


def test_disk_full_mid_checkpoint_keeps_the_earlier_ones_and_resume_works_once_space_is_freed(tmpfs, tmp_path):
    ckpts, out = tmpfs(TWO_CHECKPOINTS), tmp_path / "run"
    args = [*TINY, "--steps", "8", "--ckpt-every", "2", "--keep-ckpts", "0", "--ckpt-dir", str(ckpts), "--out", str(out)]
    result = run_cli(args, np=2, timeout=120)
    assert_usage_error(result, "(OSError: [Errno 28] No space left on device)")
    done = checkpoint.complete_checkpoints(ckpts)
    assert 1 <= len(done) < 4, result.stderr  # the tmpfs is sized so that some fit and some do not
    failed_step = int(done[-1].name[5:]) + 2
    assert error_line(result).startswith(f"error: checkpoint step-{failed_step}: rank "), result.stderr
    assert error_line(result).endswith(f"; earlier checkpoints in {ckpts} are untouched")
    assert sorted(os.listdir(ckpts)) == sorted(p.name for p in done)  # no .step-N.tmp left to fill the disk
    for path in done:
        for rank in range(2):
            assert checkpoint.verify(path, rank) is None
    remount(ckpts, "size=8m")  # space freed
    again = run_cli([*args, "--resume", "auto"], np=2, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {done[-1]} at step {failed_step - 2}" in again.stdout
    assert [p.name for p in checkpoint.complete_checkpoints(ckpts)] == [f"step-{s}" for s in (2, 4, 6, 8)]
    assert checkpoint.load(out / "model.pt")["step"] == 8


@pytest.mark.parametrize("size, extra, victim", [
    ("32k", ["--steps", "4"], "model.pt"),  # config, metrics, summary fit; model.pt (35 kB) does not
    ("8k", ["--steps", "14", "--log-every", "1"], "metrics.jsonl"),  # one 4 kB page of metrics lines
])
def test_disk_full_in_a_file_only_rank_0_writes_stops_every_rank(tmpfs, size, extra, victim):
    out = tmpfs(size) / "run"
    result = run_cli([*TINY, *extra, "--out", str(out)], np=2, timeout=120)
    assert_usage_error(result, f"rank 0 could not write {out / victim} (OSError: [Errno 28] No space left on device)")
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # model.pt's temporary file is removed


def test_read_only_out_dir_is_refused_before_training(tmpfs):
    mount = tmpfs("64k")
    remount(mount, "ro")
    result = run_cli([*TINY, "--steps", "2", "--out", str(mount / "run")], np=2, timeout=120)
    assert_usage_error(result, f"--out {mount / 'run'}: cannot create or write (Read-only file system)")
    assert "step 0" not in result.stdout  # nothing was built or trained


def test_ckpt_dir_under_a_regular_file_is_refused_before_training(tmp_path):
    (tmp_path / "a-file").write_text("")
    ckpts = tmp_path / "a-file" / "ckpt"
    result = run_cli([*TINY, "--steps", "2", "--ckpt-every", "1", "--ckpt-dir", str(ckpts), "--out", str(tmp_path / "run")],
                     np=2, timeout=120)
    assert_usage_error(result, f"--ckpt-dir {ckpts}: cannot create or write (Not a directory)")


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until its file system is full (ENOSPC); returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as err:
        assert err.errno == 28, err
    finally:
        os.close(fd)
    return filler


def test_disk_full_in_rank_0s_manifest_write_leaves_no_partial_checkpoint(tmpfs):
    where = tmpfs("256k")
    writer = checkpoint.Writer(where, MPI.COMM_SELF, keep=0)
    state = {"x": torch.arange(1000.0)}
    writer.begin(1, state, {"step": 1})
    assert writer.finish() == where / "step-1"
    writer.begin(2, state, {"step": 2})
    writer._thread.join()  # the rank file is written; now the disk fills before rank 0 seals it
    filler = fill(where)
    message = (f"checkpoint step-2: rank 0 could not write its meta.json, manifest.json or DONE "
               f"(OSError: [Errno 28] No space left on device); earlier checkpoints in {where} are untouched")
    with pytest.raises(UsageError) as raised:
        writer.finish()
    assert str(raised.value) == message
    assert sorted(os.listdir(where)) == ["filler", "step-1"]
    assert checkpoint.verify(where / "step-1", 0) is None
    filler.unlink()
    writer.begin(3, state, {"step": 3})
    assert writer.finish() == where / "step-3"
    assert [p.name for p in checkpoint.complete_checkpoints(where)] == ["step-1", "step-3"]
