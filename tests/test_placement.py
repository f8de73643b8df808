"""Placement: compute threads come from the affinity mask shared out over the ranks that share it."""

import pytest

from mpilm.comm import world

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--steps", "2", "--log-every", "1", "--eval-batches", "2"]


def test_threads_follow_the_mask_not_the_machine():
    assert world.cpu_threads({0}, [{0}], {}) == 1                   # taskset -c 0, one rank
    assert world.cpu_threads({0, 1, 2, 3}, [{0, 1, 2, 3}] * 2, {}) == 2  # two ranks share four cores
    assert world.cpu_threads({0, 1}, [{0, 1}, {2, 3}], {}) == 2       # bound ranks do not share
    assert world.cpu_threads({0}, [{0}] * 3, {}) == 1                 # oversubscribed: at least one
    assert world.cpu_threads({0, 1}, [{0, 1}] * 2, {"SLURM_CPUS_PER_TASK": "3"}) == 3
    assert world.cpu_threads({0, 1}, [{0, 1}], {"OMP_NUM_THREADS": "4", "SLURM_CPUS_PER_TASK": "3"}) == 4
    for bad in ("0", "x", "-1"):
        with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
            world.cpu_threads({0}, [{0}], {"OMP_NUM_THREADS": bad})


def test_compact_core_lists():
    assert world.compact_cores([3, 0, 1, 2, 7]) == "0-3,7"
    assert world.compact_cores([]) == ""


def test_banner_says_one_thread_per_rank_under_taskset(cli, tmp_path):
    done = cli(["-m", "mpilm.train", *TINY, "--out", str(tmp_path)], np=2, prefix=["taskset", "-c", "0"])
    assert done.returncode == 0, done.stderr
    node_lines = [line for line in done.stdout.splitlines() if line.startswith("node ")]
    assert len(node_lines) == 1 and "ranks 0-1 | cores 0 | 1 thread(s) per rank | cpu" in node_lines[0]


def test_a_bad_thread_variable_is_one_error_on_every_rank(cli, tmp_path):
    done = cli(["-m", "mpilm.train", *TINY, "--out", str(tmp_path)], np=2, env={"OMP_NUM_THREADS": "0"})
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == \
        ["error: OMP_NUM_THREADS='0': expected a whole number >= 1"]
