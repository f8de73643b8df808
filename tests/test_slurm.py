"""The Slurm scripts of ``batch/`` under a real Slurm on this machine (``make test-slurm``).

A throw-away Slurm (``tests/local_slurm.py``: munged, slurmctld, slurmd; one node claiming 16
CPUs and 16 GPUs) runs the project's own scripts with a tiny model: the one-node script with
``srun --mpi=pmi2``, pre-empted by ``SIGUSR1`` (what ``--signal=USR1@60`` sends), requeued and
resumed; the multi-node script in its ``mpiexec``-inside-the-allocation form; the scaling sweep
and its report job. Every job is submitted at module start so they run side by side. Plain
``srun -n 2 python -m mpilm.train`` must stop with the launch error on both tasks.

Runs only with ``MPILM_SLURM_TESTS=1`` (the Makefile target sets it) and as root; skipped with
the reason otherwise, so ``make test`` does not start daemons or install packages.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from batchjobs import BATCH, finished, tiny_env, wait_for_checkpoint
from conftest import ROOT

pytestmark = [
    pytest.mark.skipif(os.environ.get("MPILM_SLURM_TESTS") != "1",
                       reason="Slurm tests run with make test-slurm (they install slurm-wlm and start its daemons)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a local Slurm needs root (SlurmUser=root, apt-get)"),
]

PREEMPT_STEPS = 300  # long enough that the signal lands mid-run, short enough to finish soon after
TASKS = ["--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"]  # the scripts ask for 4 of 8-CPU tasks
PYTHON = sys.executable


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    from local_slurm import LocalSlurm

    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory):
    """Every batch job, submitted at once: ``{name: (job id, run or sweep directory)}``."""
    tmp = tmp_path_factory.mktemp("jobs")
    submitted = {}
    out = tmp / "one-node"
    submitted["one-node"] = (slurm.sbatch(BATCH / "slurm-one-node.sbatch", *TASKS, f"--output={tmp}/one-node.log",
                                          env={**tiny_env(tmp, PREEMPT_STEPS, ckpt_every=10), "MPILM_OUT": str(out)},
                                          cwd=ROOT), out)
    out = tmp / "multi-node-mpiexec"
    submitted["mpiexec"] = (slurm.sbatch(BATCH / "slurm-multi-node.sbatch", "--nodes=1", *TASKS,
                                         f"--output={tmp}/mpiexec.log",
                                         env={**tiny_env(tmp, 3), "MPILM_OUT": str(out), "MPILM_LAUNCH": "mpiexec"},
                                         cwd=ROOT), out)
    sweep = tmp / "sweep"
    done = slurm.run("bash", str(BATCH / "slurm-scaling-sweep.sh"), cwd=ROOT, env={
        **tiny_env(tmp, 3), "MPILM_SWEEP_RANKS": "1 2", "MPILM_SWEEP_DIR": str(sweep),
        "MPILM_SWEEP_SBATCH": "--cpus-per-task=1"})
    submitted["sweep"] = (done.stdout.split()[-1], sweep)
    return submitted


def test_srun_offers_pmi2_and_pmix(slurm):
    listed = slurm.run("srun", "--mpi=list")
    types = listed.stdout + listed.stderr
    assert "pmi2" in types and "pmix" in types, types


def test_one_node_script_is_preempted_requeued_and_resumes(slurm, jobs):
    job, out = jobs["one-node"]
    wait_for_checkpoint(out, 10, timeout=150, alive=lambda: slurm.job(job)["JobState"] in ("PENDING", "RUNNING"))
    # what --signal=USR1@60 does 60 s before the time limit: SIGUSR1 to the job's steps
    slurm.run("scancel", "--signal=USR1", job)
    fields = slurm.wait(job, timeout=170)
    log = (out.parent / "one-node.log").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-3000:]
    assert fields["Restarts"] == "1", log[-3000:]
    assert "launch srun" in log and "pre-empted by a signal at step" in log and "requeueing job" in log
    assert "resumed from" in log and "attempt 2" in log
    finished(out, PREEMPT_STEPS, ranks=2)


def test_multi_node_script_in_the_mpiexec_form(slurm, jobs):
    job, out = jobs["mpiexec"]
    fields = slurm.wait(job)
    log = (out.parent / "mpiexec.log").read_text()
    assert fields["JobState"] == "COMPLETED", log[-3000:]
    assert "launch mpiexec" in log and "MPICH" in log
    finished(out, 3, ranks=2)


def test_scaling_sweep_reports_weak_and_strong(slurm, jobs):
    job, sweep = jobs["sweep"]
    fields = slurm.wait(job, timeout=170)
    report = (sweep / "report.out").read_text() if (sweep / "report.out").exists() else "(no report.out)"
    assert fields["JobState"] == "COMPLETED", report + "".join(p.read_text()[-2000:] for p in (sweep / "logs").glob("*"))
    for kind, accum in (("weak", [1, 1]), ("strong", [2, 1])):
        doc = json.loads((sweep / f"{kind}-report.json").read_text())
        assert doc["kind"] == kind and [r["world_size"] for r in doc["rows"]] == [1, 2], doc
        assert (sweep / f"{kind}-report.png").stat().st_size > 0
        for n, a in zip((1, 2), accum):
            directory = sweep / ("weak" if kind == "weak" or n == 2 else "strong") / f"n{n}"
            assert json.loads((directory / "config.json").read_text())["grad_accum"] == a
    assert "weak scaling" in report and "strong scaling" in report


def test_plain_srun_of_two_tasks_is_refused_on_both(slurm):
    done = slurm.run("srun", "-n", "2", PYTHON, "-m", "mpilm.train", "--steps", "1", check=False, cwd=ROOT)
    message = "error: srun started 2 separate 1-rank jobs; launch with srun --mpi=pmi2 (or pmix), or mpiexec"
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count(message) == 2 and "Traceback" not in done.stderr, done.stderr


def test_srun_with_pmi2_makes_one_world_and_sbatch_alone_is_one_process(slurm, tmp_path):
    done = slurm.run("srun", "--mpi=pmi2", "-n", "2", PYTHON, "-c",
                     "from mpilm.comm import world; print(world.size(), world.launch_problem())", cwd=ROOT)
    assert done.stdout.split() == ["2", "None", "2", "None"], done.stdout + done.stderr
    # a batch script of 2 tasks running one python is legitimate (SLURM_NTASKS=2, no step)
    job = slurm.run("sbatch", "--parsable", "-n", "2", f"--output={tmp_path}/wrap.log",
                    f"--wrap={PYTHON} -c 'from mpilm.comm import world; print(\"problem:\", world.launch_problem())'",
                    cwd=ROOT).stdout.strip().split(";")[0]
    fields = slurm.wait(job)
    assert fields["JobState"] == "COMPLETED" and "problem: None" in (tmp_path / "wrap.log").read_text()
