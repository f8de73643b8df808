"""``python -m mpilm.cluster``: its pure helpers, its usage errors, and (as root) a real cluster.

The root tests bring up their own cluster (``MPILM_CLUSTER=mpilmtest``, state in a temp dir) and
remove it at the end, also when a test fails. Multi-node MPI correctness runs separately, under
``make test-multinode``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from mpilm import cluster
from mpilm.cluster import ClusterError

pytestmark = pytest.mark.system  # make test-system (Makefile)

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="python -m mpilm.cluster needs root (network namespaces)")


def cli(*args, timeout=120, env=None):
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(["timeout", "--kill-after=5", str(timeout), sys.executable, "-m", "mpilm.cluster", *args],
                          capture_output=True, text=True, env=full, cwd=ROOT)


# ---------------------------------------------------------------- pure helpers
def test_rates_are_tc_rates():
    assert cluster.rate_bits("100mbit") == 100e6
    assert cluster.rate_bits("1gbit") == 1e9
    assert cluster.rate_bits("10Gbit") == 10e9
    assert cluster.rate_bits("125mbps") == 1e9
    assert cluster.rate_bits("1mibit") == 2**20
    for bad in ("fast", "1", "gbit", "-1gbit", "1 gbit"):
        with pytest.raises(ClusterError, match="not a tc rate"):
            cluster.rate_bits(bad)
    assert cluster.burst_bytes(100e6) == 125_000 and cluster.burst_bytes(1e6) == 64 << 10


def test_cores_split_evenly_and_wrap_only_when_oversubscribed():
    assert cluster.split_cores([0, 1], 2, None, False) == [[0], [1]]
    assert cluster.split_cores([0, 1, 2, 3], 2, None, False) == [[0, 1], [2, 3]]
    assert cluster.split_cores([2, 5, 7, 9], 2, 1, False) == [[2], [5]]
    with pytest.raises(ClusterError, match="--oversubscribe"):
        cluster.split_cores([0, 1], 3, None, False)
    assert cluster.split_cores([0, 1], 3, None, True) == [[0], [1], [0]]
    assert cluster.compact([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_ssh_command_lines_parse_as_openssh_does():
    assert cluster.parse_ssh(["-x", "node1", "hydra_pmi_proxy", "--control-port", "node0:1234"]) == \
        ("node1", "hydra_pmi_proxy --control-port node0:1234")
    assert cluster.parse_ssh(["-o", "StrictHostKeyChecking=no", "-p", "22", "root@node2", "orted -mca x 'a b'"]) == \
        ("node2", "orted -mca x 'a b'")
    assert cluster.parse_ssh(["-oBatchMode=yes", "-T", "node0", "--", "true"]) == ("node0", "-- true")
    with pytest.raises(ClusterError, match="no command"):
        cluster.parse_ssh(["-x", "node1"])


def test_launch_plan_checks_the_slots():
    nodes = [cluster.Node(f"node{i}", f"t-node{i}", f"10.0.0.{i}", f"p{i}", [i], 2) for i in range(2)]
    c = cluster.Cluster("t", "1gbit", nodes)
    assert cluster.launch_plan(c, None, None) == (4, None)
    assert cluster.launch_plan(c, None, 1) == (2, 1)
    assert cluster.launch_plan(c, 3, None) == (3, None)
    with pytest.raises(ClusterError, match="slot"):
        cluster.launch_plan(c, 5, None)
    with pytest.raises(ClusterError, match="--slots-per-node 3"):
        cluster.launch_plan(c, None, 3)


@pytest.mark.parametrize("args,message", [
    (["up", "--nodes", "1"], "--nodes 1"),
    (["up", "--nodes", "2", "--link", "fast"], "--link fast: not a tc rate"),
    (["up", "--nodes", "64"], "--oversubscribe"),
    (["up"], "--nodes"),
    (["bogus"], "invalid choice"),
])
def test_usage_errors_are_one_line_and_exit_2(args, message):
    done = cli(*args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr and "Traceback" not in done.stderr


def test_run_without_a_cluster_says_how_to_start_one(tmp_path):
    done = cli("run", "--", "true", env={"MPILM_CLUSTER": "nocluster", "MPILM_CLUSTER_STATE": str(tmp_path)})
    assert done.returncode == 2
    assert "no cluster 'nocluster' is up" in done.stderr or "needs root" in done.stderr


# ---------------------------------------------------------------- a real cluster (root)
@pytest.fixture(scope="module")
def up(tmp_path_factory):
    env = {"MPILM_CLUSTER": "mpilmtest", "MPILM_CLUSTER_STATE": str(tmp_path_factory.mktemp("cluster"))}
    done = cli("up", "--nodes", "2", "--link", "100mbit", env=env)
    assert done.returncode == 0, done.stderr
    yield env
    done = cli("down", env=env)
    assert done.returncode == 0, done.stderr
    assert not [n for n in cluster.live_namespaces() if n.startswith("mpilmtest-")]


@NEEDS_ROOT
def test_nodes_have_names_addresses_and_cpu_sets(up):
    mask = sorted(os.sched_getaffinity(0))
    done = cli("exec", "node1", "--", "sh", "-c", "hostname; getent hosts node0; taskset -pc $$", env=up)
    assert done.returncode == 0, done.stderr
    name, hosts, affinity = done.stdout.splitlines()
    assert name == "node1" and hosts.split() == [f"{cluster.SUBNET}.1", "node0"]
    assert affinity.rsplit(":", 1)[1].strip() == str(mask[1 % len(mask)])
    status = cli("status", env=up)
    assert status.returncode == 0 and "node0" in status.stdout and "100Mbit up" in status.stdout
    # the machine's own /etc/hosts is untouched
    assert "node1" not in open("/etc/hosts").read()


@NEEDS_ROOT
def test_run_launches_on_every_node_and_returns_the_job_status(up):
    done = cli("run", "--", sys.executable, "-c",
               "import socket, mpi4py.MPI as M; names = M.COMM_WORLD.gather(socket.gethostname()); "
               "M.COMM_WORLD.rank or print(*names)", env=up)  # one printer: ranks' output interleaves
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["node0", "node1"]
    assert cli("run", "--", "sh", "-c", "exit 3", env=up).returncode == 3
    done = cli("run", "-np", "3", "--", "true", env=up)
    assert done.returncode == 2 and "slot" in done.stderr


@NEEDS_ROOT
def test_faults_stop_continue_kill_and_links(up):
    sleeper = subprocess.Popen([sys.executable, "-m", "mpilm.cluster", "exec", "node1", "--", "sleep", "60"],
                               env={**os.environ, "PYTHONPATH": str(ROOT), **up})
    try:
        for _ in range(50):
            if cluster.namespace_pids("mpilmtest-node1"):
                break
            time.sleep(0.1)
        assert "1 (sleep)" in cli("status", env=up).stdout
        assert "SIGSTOP to 1" in cli("stop", "node1", env=up).stdout
        assert "SIGCONT to 1" in cli("cont", "node1", env=up).stdout
        assert cli("link", "node1", "--rate", "1gbit", env=up).returncode == 0
        assert cli("link", "node1", "down", env=up).returncode == 0
        assert "down" in cli("status", env=up).stdout
        assert cli("link", "node1", "up", env=up).returncode == 0
        assert "SIGKILL to 1" in cli("kill", "node1", env=up).stdout
        assert sleeper.wait(timeout=10) == -9
    finally:
        sleeper.kill()
    status = cli("status", env=up).stdout
    assert "1Gbit up" in status


@NEEDS_ROOT
def test_bench_ddp_loss_check_across_nodes(up, tmp_path):
    """torch.distributed's rendezvous finds rank 0 through the hosts file alone (no getfqdn)."""
    import json
    import sysconfig
    from pathlib import Path

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes((Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_bytes())
    out = tmp_path / "ddp.json"
    done = cli("run", "--", sys.executable, "-m", "mpilm.bench", "ddp", "--algorithms", "ring", "--warmup", "1",
               "--block-steps", "2", "--check-steps", "3", "--json", str(out), "--",
               "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
               "--steps", "4", "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), env=up, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["loss_check_ok"] and doc["world_size"] == 2 and doc["rows"][0]["loss_max_abs_diff"] <= 1e-4


@NEEDS_ROOT
def test_bench_allreduce_tune_under_cluster_run(up, tmp_path):
    """``auto``'s thresholds can be measured on the cluster: one entry per (np, ranks per node)."""
    import json

    tuning = tmp_path / "tuning.json"
    done = cli("run", "--", sys.executable, "-m", "mpilm.bench", "allreduce", "--tune", "--tuning-file", str(tuning),
               "--algorithms", "ring,tree,mpi", "--min-bytes", "4K", "--max-bytes", "64K", "--factor", "16",
               "--iters", "2", "--warmup", "1", env=up, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    entries = json.loads(tuning.read_text())["entries"]
    assert list(entries) == ["np2-rpn1-float32"] and entries["np2-rpn1-float32"]["rules"][-1][0] is None


@NEEDS_ROOT
@pytest.mark.parametrize("fault, restore", [(("stop", "node1"), ("cont", "node1")),
                                            (("link", "node1", "down"), ("link", "node1", "up"))])
def test_a_stopped_node_or_a_dead_link_ends_the_job_naming_the_silent_peer(up, tmp_path, fault, restore):
    """#12's watchdog on real (emulated) nodes: the job ends within --comm-timeout + 10 s, by itself."""
    timeout_s = 5
    job = subprocess.Popen(
        [sys.executable, "-m", "mpilm.cluster", "run", "--", sys.executable, "-m", "mpilm.train", "--n-layer", "1",
         "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--steps", "100000", "--log-every", "20",
         "--eval-every", "100000", "--comm-timeout", str(timeout_s), "--out", str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT), **up}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not ((tmp_path / "metrics.jsonl").is_file() and (tmp_path / "metrics.jsonl").read_text()):
            assert job.poll() is None and time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.2)  # training is under way on both nodes
        assert cli(*fault, env=up).returncode == 0
        t0 = time.monotonic()
        _, stderr = job.communicate(timeout=timeout_s + 30)  # a hang fails here
        ended_after = time.monotonic() - t0
    finally:
        job.kill()
        cli(*restore, env=up)
    assert job.returncode not in (0, None)
    assert ended_after < timeout_s + 10, (ended_after, stderr[-2000:])
    assert "[rank 0] error: stalled for" in stderr and "from rank 1 (node node1): stopped, dead, or cut off" in stderr, \
        stderr[-2000:]
    for _ in range(50):  # the cut-off side's own watchdog ends its processes too
        if not cluster.namespace_pids("mpilmtest-node1"):
            break
        time.sleep(0.2)
    assert not cluster.namespace_pids("mpilmtest-node1")
