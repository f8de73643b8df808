"""Launch sanity (``world.launch_problem``): N processes that MPI sees as N separate 1-rank jobs.

The decision on fake environments of each launcher, then the real command line: the error is one
line, exit status 2, no traceback. Under a real Slurm, ``tests/test_slurm.py`` runs plain
``srun -n 2`` (refused) and ``srun --mpi=pmi2 -n 2`` and a 2-task batch script (accepted).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from mpilm.comm import world

MPICH = "MPICH 5.0.2"
SRUN_ERROR = "srun started 4 separate 1-rank jobs; launch with srun --mpi=pmi2 (or pmix), or mpiexec"
# the environments the launchers give their processes (the parts launch_problem reads)
SRUN_STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4",
             "SLURM_NPROCS": "4"}
SBATCH_SCRIPT = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_NPROCS": "4"}
HYDRA = {"PMI_RANK": "0", "PMI_SIZE": "4", "PMI_FD": "9"}


def problem(env, world_size=1):
    return world.launch_problem(env, world_size=world_size, library=MPICH)


def test_plain_srun_of_several_tasks_is_refused():
    assert problem(SRUN_STEP) == SRUN_ERROR
    assert problem({"SLURM_STEPID": "0", "SLURM_NTASKS": "4"}) == SRUN_ERROR  # older Slurm, no STEP_NUM_TASKS
    assert problem({**SRUN_STEP, "SLURM_MPI_TYPE": "none"}) == SRUN_ERROR


def test_srun_with_a_pmi_the_library_does_not_speak_names_it():
    message = problem({**SRUN_STEP, "SLURM_MPI_TYPE": "pmix"})
    assert message.startswith("srun --mpi=pmix started 4 separate 1-rank jobs: MPICH 5.0.2 did not join srun's pmix")
    assert "srun --mpi=list" in message
    assert problem({**SRUN_STEP, "SLURM_MPI_TYPE": "pmi2", "PMI_SIZE": "4"}).startswith("srun --mpi=pmi2 started 4")


def test_a_foreign_mpiexec_is_refused_with_its_own_wording():
    assert problem(HYDRA).startswith("mpiexec started 4 separate 1-rank jobs: its process manager is not that of "
                                     "MPICH 5.0.2")
    pbs = problem({**HYDRA, "PBS_JOBID": "12.server", "PBS_NODEFILE": "/var/spool/pbs/aux/12"})
    assert "in PBS job 12.server" in pbs and "mpiexec -f $PBS_NODEFILE" in pbs
    ompi = problem({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"})
    assert ompi.startswith("Open MPI's mpirun started 4 separate 1-rank jobs: mpi4py runs MPICH 5.0.2, not Open MPI")


@pytest.mark.parametrize("env", [
    {},                                                              # python -m mpilm.train
    SBATCH_SCRIPT,                                                   # one process in an sbatch -n 4 script
    {**SBATCH_SCRIPT, "PBS_JOBID": "12.server", "PBS_NP": "8"},      # PBS runs the script once
    {**SRUN_STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"},  # srun -n 1
    {**SRUN_STEP, "PMI_SIZE": "1"},                                  # mpiexec -np 1 whose proxy srun started
    {"OMPI_COMM_WORLD_SIZE": "1"},                                   # Open MPI's mpirun -np 1
    {"PMI_SIZE": "1"},                                               # mpiexec -np 1
    {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "x"},             # an unreadable count is no evidence
], ids=["bare", "sbatch", "pbs-script", "srun-n1", "hydra-in-a-step", "ompi-np1", "hydra-np1", "garbage"])
def test_legitimate_single_processes_pass(env):
    assert problem(env) is None


@pytest.mark.parametrize("env", [SRUN_STEP, HYDRA, {"OMPI_COMM_WORLD_SIZE": "4"}])
def test_a_real_world_of_several_ranks_always_passes(env):
    assert problem(env, world_size=4) is None


def python(args, env):
    """``python ARGS`` as srun starts each task: no mpirun, the launcher's variables in the environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_", "HYDRA", "SLURM_", "OMPI_"))}
    return subprocess.run(["timeout", "--kill-after=5", "60", sys.executable, *args], capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT)


def test_the_command_line_stops_with_one_line_and_status_2(tmp_path):
    done = python(["-m", "mpilm.train", "--steps", "1", "--out", str(tmp_path)],
                  {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "3", "SLURM_NTASKS": "3"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "error: srun started 3 separate 1-rank jobs; launch with srun --mpi=pmi2 (or pmix), or mpiexec"
    assert not any(tmp_path.iterdir())  # stopped before any work
    # the same variables without a step (an sbatch script's own environment): no objection
    done = python(["-m", "mpilm.train", "--help"], {"SLURM_NTASKS": "3", "SLURM_JOB_ID": "7"})
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
