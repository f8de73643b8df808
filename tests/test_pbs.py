"""``batch/pbs.sh`` run as PBS runs a job script, on an emulated two-node cluster (root only).

No PBS server is packaged for Debian, so the test does what PBS's MoM does: runs the script with
``bash`` on the first node (``python -m mpilm.cluster exec node0``, cluster ``mpilmpbs``, always
taken down) with ``PBS_NODEFILE`` (one line per rank slot, made from the cluster's hostfile),
``PBS_O_WORKDIR`` and ``PBS_JOBID`` set. A ``qsub`` stand-in records what the script submits.
The first job gets ``SIGUSR1`` (``qsig -s USR1``) after its first checkpoint: the script must
pass it to mpiexec, see exit 75, and submit itself again with its settings and run directory;
running that submission as PBS would must resume and finish the run on both nodes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from batchjobs import BATCH, finished, tiny_env, wait_for_checkpoint
from conftest import ROOT

pytestmark = [pytest.mark.system,  # make test-system (Makefile)
              pytest.mark.skipif(os.geteuid() != 0, reason="python -m mpilm.cluster needs root (network namespaces)")]

STEPS = 300
QSUB = """#!/bin/sh
# stands in for PBS's qsub: records the command line, answers with a job id
printf '%s\\n' "$@" > "$(dirname "$0")/qsub.args"
echo 2.emulated
"""


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "MPILM_CLUSTER": "mpilmpbs", "MPILM_CLUSTER_STATE": str(state), "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run([sys.executable, "-m", "mpilm.cluster", "up", "--nodes", "2"], capture_output=True,
                              text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        yield env, state / "mpilmpbs" / "hostfile"
    finally:
        subprocess.run([sys.executable, "-m", "mpilm.cluster", "down"], capture_output=True, env=env, timeout=120)


def pbs_job(env, nodefile, job_id, settings, fake_bin, log):
    """``bash batch/pbs.sh`` on node0 as PBS starts it (the ssh shim stays first on PATH)."""
    job_env = {**env, **settings, "PBS_NODEFILE": str(nodefile), "PBS_O_WORKDIR": str(ROOT),
               "PBS_JOBID": job_id, "PBS_JOBNAME": "pbs.sh", "FAKE_BIN": str(fake_bin)}
    return subprocess.Popen([sys.executable, "-m", "mpilm.cluster", "exec", "node0", "--", "sh", "-c",
                             'PATH="$FAKE_BIN:$PATH" exec bash "$0"', str(BATCH / "pbs.sh")],
                            env=job_env, stdout=log, stderr=subprocess.STDOUT, cwd=os.environ.get("HOME", "/"))


def test_pbs_script_on_two_nodes_preempted_resubmitted_and_resumed(nodes, tmp_path):
    env, hostfile = nodes
    # PBS's node file: one line per rank slot (mpiprocs), from the cluster's Hydra hostfile
    slots = [line.split(":") for line in hostfile.read_text().split()]
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("".join(f"{host}\n" * int(n) for host, n in slots))
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "qsub").write_text(QSUB)
    (fake_bin / "qsub").chmod(0o755)
    out = tmp_path / "run"
    settings = {**tiny_env(tmp_path, STEPS, ckpt_every=10), "MPILM_OUT": str(out)}

    first_log = tmp_path / "job1.log"
    with open(first_log, "w") as log:
        job = pbs_job(env, nodefile, "1.emulated", settings, fake_bin, log)
        try:
            wait_for_checkpoint(out, 10, timeout=150, alive=lambda: job.poll() is None)
            job.send_signal(signal.SIGUSR1)  # the chain of execs leaves bash with the launcher's pid
            status = job.wait(timeout=120)
        finally:
            job.kill()
    text = first_log.read_text()
    assert status == 0, text[-3000:]
    assert "mpilm: PBS job 1.emulated: 2 rank(s) on node0,node1" in text
    assert "pre-empted by a signal at step" in text and "submitting the next job" in text
    args = (fake_bin / "qsub.args").read_text().splitlines()
    assert args[0] == "-v" and args[-1] == str(BATCH / "pbs.sh"), args
    resubmitted = dict(re.findall(r"(MPILM_[A-Z_]+)='([^']*)'", args[1]))
    assert resubmitted["MPILM_OUT"] == str(out) and resubmitted["MPILM_ARGS"] == settings["MPILM_ARGS"]

    second_log = tmp_path / "job2.log"
    with open(second_log, "w") as log:
        job = pbs_job(env, nodefile, "2.emulated", resubmitted, fake_bin, log)
        try:
            status = job.wait(timeout=180)
        finally:
            job.kill()
    text = second_log.read_text()
    assert status == 0, text[-3000:]
    assert "resumed from" in text and "2 rank(s) on 2 node(s)" in text
    finished(out, STEPS, ranks=2)
