"""``hostfiles/``: each example in MPICH/Hydra (``host:N``) and Open MPI (``host slots=N``) syntax.

The two syntaxes of each example name the same hosts and slots; ``localhost.hydra`` starts a
2-rank world here; as root, on an emulated two-node cluster (``python -m mpilm.cluster``, named
``mpilmhf``, always taken down), ``two-nodes.hydra`` launches a tiny training with one rank on
each node, and ``two-nodes.openmpi`` places Open MPI's ranks on both nodes when Open MPI's
``mpirun`` is installed (``make test-system-mpi`` installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from batchjobs import CORPUS, TINY_MODEL
from conftest import BIN, ROOT

HOSTFILES = ROOT / "hostfiles"
EXAMPLES = ("localhost", "two-nodes")
OPENMPI_MPIRUN = shutil.which("mpirun.openmpi")
# Open MPI refuses root without this, and more ranks than the cores it counts without --oversubscribe
OPENMPI_ROOT = ["--allow-run-as-root", "--oversubscribe"] if os.geteuid() == 0 else []
CLUSTER_ENV = {"MPILM_CLUSTER": "mpilmhf"}


def entries(path) -> list[tuple[str, int]]:
    """``(host, slots)`` per line of a hostfile in either syntax; comments and blank lines skipped."""
    found = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([\w.-]+):(\d+)", line) or re.fullmatch(r"([\w.-]+)\s+slots=(\d+)", line)
        assert m, f"{path.name}: not a hostfile line: {line!r}"
        found.append((m.group(1), int(m.group(2))))
    return found


def run(argv, timeout=120, env=None):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_", "HYDRA", "OMPI_"))}
    return subprocess.run(["timeout", "--kill-after=5", str(timeout), *argv], capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=ROOT)


@pytest.mark.parametrize("example", EXAMPLES)
def test_both_syntaxes_name_the_same_hosts_and_slots(example):
    hydra, openmpi = HOSTFILES / f"{example}.hydra", HOSTFILES / f"{example}.openmpi"
    assert ":" in hydra.read_text() and "slots=" in openmpi.read_text()
    assert entries(hydra) == entries(openmpi) and entries(hydra)


def test_localhost_hydra_starts_one_world():
    done = run([str(BIN / "mpiexec"), "-f", str(HOSTFILES / "localhost.hydra"), "-np", "2", sys.executable, "-c",
                "from mpi4py import MPI; sizes = MPI.COMM_WORLD.gather(MPI.COMM_WORLD.Get_size()); "
                "MPI.COMM_WORLD.rank or print(*sizes)"])  # one printer: ranks' output interleaves
    assert done.returncode == 0 and done.stdout.split() == ["2", "2"], done.stderr


@pytest.mark.skipif(OPENMPI_MPIRUN is None, reason="Open MPI's mpirun.openmpi is not installed")
def test_localhost_openmpi_places_two_ranks():
    done = run([OPENMPI_MPIRUN, *OPENMPI_ROOT, "--hostfile", str(HOSTFILES / "localhost.openmpi"), "-np", "2",
                "hostname"])
    assert done.returncode == 0 and len(done.stdout.split()) == 2, done.stderr


# ---------------------------------------------------------------- two emulated nodes (root)
@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("python -m mpilm.cluster needs root (network namespaces)")
    env = {**CLUSTER_ENV, "MPILM_CLUSTER_STATE": str(tmp_path_factory.mktemp("cluster"))}
    try:
        done = run([sys.executable, "-m", "mpilm.cluster", "up", "--nodes", "2"], env=env)
        assert done.returncode == 0, done.stderr
        yield env
    finally:
        run([sys.executable, "-m", "mpilm.cluster", "down"], env=env)


def on_node0(argv, env, timeout=180):
    return run([sys.executable, "-m", "mpilm.cluster", "exec", "node0", "--", *argv], timeout=timeout, env=env)


def test_two_nodes_hydra_trains_one_rank_per_node(two_nodes, tmp_path):
    out = tmp_path / "run"
    done = on_node0([str(BIN / "mpiexec"), "-f", str(HOSTFILES / "two-nodes.hydra"), "-np", "2", "-ppn", "1",
                     sys.executable, "-m", "mpilm.train", *TINY_MODEL.split(), "--batch-size", "4", "--steps", "3",
                     "--eval-batches", "1", "--device", "cpu", "--data", str(CORPUS),
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out)], two_nodes)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 rank(s) on 2 node(s)" in done.stdout
    assert "node node0: ranks 0" in done.stdout and "node node1: ranks 1" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3


@pytest.mark.skipif(OPENMPI_MPIRUN is None, reason="Open MPI's mpirun.openmpi is not installed")
def test_two_nodes_openmpi_places_a_rank_on_each_node(two_nodes):
    done = on_node0([OPENMPI_MPIRUN, *OPENMPI_ROOT, "--hostfile", str(HOSTFILES / "two-nodes.openmpi"), "-np", "2",
                     "--map-by", "ppr:1:node", "hostname"], two_nodes, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == ["node0", "node1"]
