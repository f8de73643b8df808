"""``make gpu-check DRY=1``: the GPU check's script (``tools/gpu-check.sh``) runs every stage on the
CPU at toy sizes and writes its tables, so the script a lent GPU machine runs is known to work
before its minutes are spent. Serial test (the script launches its own mpirun jobs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.system  # make test-system (Makefile)

STAGES = ("kernels", "tests", "allreduce", "train", "report")


def test_dry_run_passes_every_stage_and_writes_the_tables(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_", "HYDRA", "OMPI_", "PMIX_"))}
    env.update(DRY="1", VENV=str(Path(sys.executable).parents[1]), PYTHON=sys.executable)
    env.pop("OUT", None)
    done = subprocess.run(["timeout", "--kill-after=5", "240", str(ROOT / "tools" / "gpu-check.sh"), str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-2000:])
    rows = [line.split() for line in (tmp_path / "stages.txt").read_text().splitlines()[2:]]
    assert [r[0] for r in rows] == ["kernels", "train", "allreduce", "allreduce", "tests", "tests", "report", "report"]
    assert all(r[2] == "ok" for r in rows), rows
    for name in STAGES:
        assert (tmp_path / f"{name}.txt").stat().st_size > 0, name
    for n in (1, 2):
        rows = json.loads((tmp_path / f"allreduce-np{n}.json").read_text())
        assert {r["device"] for r in rows} == {"cpu"} and {r["world_size"] for r in rows} == {n}
        assert (tmp_path / f"allreduce-np{n}.png").stat().st_size > 0
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["mfu"] is None  # a CPU: no MFU
    assert json.loads((tmp_path / "report.json").read_text())["rows"][0]["world_size"] == 1
    figures = (tmp_path / "figures.txt").read_text()
    assert "tok/s | MFU -" in figures and "allreduce np 2 at " in figures
