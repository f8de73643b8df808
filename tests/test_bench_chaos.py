"""``python -m mpilm.bench chaos``: faults injected into real training jobs, resumed with
``--resume auto``, final parameters bit-identical to an uninterrupted run, no job left hanging.

The local run (two SIGKILLed ranks at -np 2) runs in this process through the bench's entry point,
like the other single-process benches. The cluster run (root only) stops one emulated node and
needs the watchdog to end the job; it brings up its own cluster and removes it, also on failure.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT
from mpilm.bench import chaos
from mpilm.bench.__main__ import main as bench_main

pytestmark = pytest.mark.system  # make test-system (Makefile)

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos-corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "corpus.txt").write_bytes((stdlib / "argparse.py").read_bytes())
    return ["--data", str(root / "corpus.txt"), "--cache-dir", str(root / "cache")]


def bench(argv, capsys):
    status = bench_main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def check_result(doc: dict, faults: int, limit_s: float) -> None:
    assert doc["passed"], json.dumps(doc["faults"], indent=1)
    assert len(doc["faults"]) == faults and doc["final"]["bit_identical"] and doc["metrics_continuous"]
    resumed = 0
    for fault in doc["faults"]:
        assert fault["ok"] and not fault["hung"] and fault["killed_by_bench"] == 0
        assert fault["ended_after_s"] <= limit_s
        # every attempt resumed from a newer checkpoint than the one before, and no later than the fault
        assert resumed < fault["resumed_from"] <= fault["at_step"]
        resumed = fault["resumed_from"]
        assert fault["lost_s"] == pytest.approx(fault["redo_s"] + fault["detect_s"] + fault["restart_s"])
        assert fault["restart_s"] > 0


def test_two_killed_ranks_resume_to_bit_identical_parameters(tmp_path, corpus, capsys):
    out = tmp_path / "chaos.json"
    status, stdout, _ = bench(["chaos", "--faults", "2", "--np", "2", "--steps", "30", "--ckpt-every", "4",
                               "--comm-timeout", "10", "--timeout", "120", "--out", str(tmp_path / "runs"),
                               "--json", str(out), "--plot", str(tmp_path / "chaos.png"), "--", *TINY, *corpus], capsys)
    assert status == 0, stdout
    doc = json.loads(out.read_text())
    check_result(doc, 2, 20)
    assert {f["kind"] for f in doc["faults"]} == {"kill-rank"}
    assert all(f["target"] in ("rank 0", "rank 1") for f in doc["faults"])
    assert len(doc["chaos"]["attempts"]) == 3  # one per fault and the last, unfaulted one
    assert "verdict: 2/2 faults injected" in stdout and "PASS" in stdout
    assert (tmp_path / "chaos.png").stat().st_size > 0


def test_usage_errors_before_anything_is_launched(capsys):
    for argv, message in ((["--kinds", "link-down"], "needs the emulated cluster (--cluster)"),
                          (["--kinds", "kill-rank,meteor"], "--kinds meteor: unknown"),
                          (["--faults", "10", "--steps", "100"], "need at least 270 steps"),
                          (["--np", "1"], "--np 1"),
                          (["--", "--steps", "5"], "--steps after --: set by the chaos bench"),
                          (["--", "--n-head", "3"], "must be divisible by --n-head 3")):
        status, _, err = bench(["chaos", *argv], capsys)
        assert status == 2 and "error: " in err and message in err, (argv, err)
    assert chaos.parse_kinds(None, on_cluster=True) == list(chaos.KINDS)
    assert chaos.parse_kinds(None, on_cluster=False) == ["kill-rank"]
    assert chaos.steps_needed(2, 4) == 28


@pytest.mark.skipif(os.geteuid() != 0, reason="python -m mpilm.cluster needs root (network namespaces)")
def test_a_stopped_node_ends_the_job_through_the_watchdog_and_resumes(tmp_path, corpus):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPILM_CLUSTER": "chaostest",
           "MPILM_CLUSTER_STATE": str(tmp_path / "cluster")}

    def cli(*args, timeout=120):
        return subprocess.run(["timeout", "--kill-after=5", str(timeout), sys.executable, *args],
                              capture_output=True, text=True, env=env, cwd=ROOT)

    done = cli("-m", "mpilm.cluster", "up", "--nodes", "2", "--link", "1gbit")
    assert done.returncode == 0, done.stderr
    try:
        out = tmp_path / "chaos.json"
        # node1: the rank there stops; rank 0's watchdog must end the job (node0 would stop the launcher too)
        done = cli("-m", "mpilm.bench", "chaos", "--cluster", "--faults", "1", "--kinds", "stop-node",
                   "--fault-nodes", "node1", "--steps", "20", "--ckpt-every", "4", "--comm-timeout", "3",
                   "--timeout", "60", "--json", str(out), "--", *TINY, *corpus,
                   # rank 0 paced (~20x its compute) so the fault lands mid-run, not after the last step,
                   # which at toy size comes within the bench's reaction time (CI saw it land there)
                   "--slow-rank", "0", "--slow-factor", "20", timeout=150)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        doc = json.loads(out.read_text())
        check_result(doc, 1, 13)
        fault = doc["faults"][0]
        assert fault["kind"] == "stop-node" and fault["target"] == "node1" and fault["exit_status"] != 0
        assert "stalled" in fault["message"] and fault["ended_after_s"] >= 3
    finally:
        cli("-m", "mpilm.cluster", "down")
