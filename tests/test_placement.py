"""Placement: compute threads come from the affinity mask shared out over the ranks that share it;
the banner says, per node, which ranks ran where with how many threads."""

import pytest

from mpilm.comm import world
from mpilm.errors import UsageError

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--steps", "2", "--log-every", "1", "--eval-batches", "2"]
NO_THREAD_VARIABLES = {name: None for name in world.THREAD_VARIABLES}  # the caller's shell must not decide


def test_threads_follow_the_mask_not_the_machine():
    assert world.cpu_threads({0}, [{0}], {}) == 1                   # taskset -c 0, one rank
    assert world.cpu_threads({0, 1, 2, 3}, [{0, 1, 2, 3}] * 2, {}) == 2  # two ranks share four cores
    assert world.cpu_threads({0, 1}, [{0, 1}, {2, 3}], {}) == 2       # bound ranks do not share
    assert world.cpu_threads({0, 1, 2}, [{0, 1, 2}, {2, 3}], {}) == 1  # an overlap counts as sharing
    assert world.cpu_threads({0}, [{0}] * 3, {}) == 1                 # oversubscribed: at least one
    assert world.cpu_threads({0, 1}, [{0, 1}] * 2, {"SLURM_CPUS_PER_TASK": "3"}) == 3
    assert world.cpu_threads({0, 1}, [{0, 1}], {"OMP_NUM_THREADS": "4", "SLURM_CPUS_PER_TASK": "3"}) == 4
    assert world.cpu_threads({0, 1}, [{0, 1}], {"OMP_NUM_THREADS": " ", "SLURM_CPUS_PER_TASK": "3"}) == 3
    for name in world.THREAD_VARIABLES:
        for bad in ("0", "x", "-1", "4,2", "2.5"):
            with pytest.raises(UsageError, match=name):
                world.cpu_threads({0}, [{0}], {name: bad})


def test_compact_core_lists():
    assert world.compact_cores([3, 0, 1, 2, 7]) == "0-3,7"
    assert world.compact_cores([0, 2]) == "0,2"
    assert world.compact_cores([]) == ""


def test_one_banner_line_describes_a_node():
    def at(cores, threads, device="cpu"):
        return world.Placement("n0", tuple(cores), threads, device)

    assert world.describe_node([(1, at([2, 3], 2)), (0, at([0, 1], 2))]) == \
        "node n0: ranks 0-1 | cores 0-3 | 2 thread(s) per rank | cpu"
    assert world.describe_node([(0, at([0, 2], 1, "cuda:0")), (2, at([0, 2], 4, "cuda:1"))]) == \
        "node n0: ranks 0,2 | cores 0,2 | 1/4 thread(s) per rank | cuda:0, cuda:1"


def node_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("node ")]


def test_banner_shows_each_nodes_ranks_cores_and_threads(cli, tmp_path):
    done = cli(["-m", "mpilm.train", *TINY, "--out", str(tmp_path)], np=2, env=NO_THREAD_VARIABLES)
    assert done.returncode == 0, done.stderr
    cores = world.compact_cores(world.affinity())
    threads = max(1, len(world.affinity()) // 2)
    assert node_lines(done.stdout) == [f"node {world.node_name()}: ranks 0-1 | cores {cores} | "
                                       f"{threads} thread(s) per rank | cpu"], done.stdout


def test_banner_says_one_thread_per_rank_under_taskset(cli, tmp_path):
    done = cli(["-m", "mpilm.train", *TINY, "--out", str(tmp_path)], np=2, prefix=["taskset", "-c", "0"],
               env=NO_THREAD_VARIABLES)
    assert done.returncode == 0, done.stderr
    lines = node_lines(done.stdout)
    assert len(lines) == 1 and lines[0].endswith(": ranks 0-1 | cores 0 | 1 thread(s) per rank | cpu"), done.stdout


def test_banner_has_a_line_per_fake_node_and_honours_omp_num_threads(cli, tmp_path):
    done = cli(["-m", "mpilm.train", *TINY, "--out", str(tmp_path)], np=2,
               env={**NO_THREAD_VARIABLES, "MPILM_RANKS_PER_NODE": "1", "OMP_NUM_THREADS": "3"})
    assert done.returncode == 0, done.stderr
    lines = node_lines(done.stdout)
    assert [line.split(": ", 1)[1].split(" | cores")[0] for line in lines] == ["ranks 0", "ranks 1"], done.stdout
    assert all(line.endswith("| 3 thread(s) per rank | cpu") for line in lines), done.stdout


def test_a_bad_thread_variable_is_one_error_on_every_rank(cli, tmp_path):
    done = cli(["-m", "mpilm.train", *TINY, "--out", str(tmp_path)], np=2, env={"OMP_NUM_THREADS": "0"})
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == \
        ["error: OMP_NUM_THREADS='0': expected a whole number >= 1"]


def test_a_bad_thread_variable_on_one_rank_stops_every_rank(cli, tmp_path):
    # the environment is per rank: only rank 1 sees the bad value, and the job must neither hang nor
    # run on with rank 0 alone
    only_rank_1 = ["sh", "-c", 'if [ "$PMI_RANK" = 1 ]; then export SLURM_CPUS_PER_TASK=two; fi; exec "$@"', "sh"]
    done = cli(["-m", "mpilm.train", *TINY, "--out", str(tmp_path)], np=2, prefix=only_rank_1, timeout=90,
               env=NO_THREAD_VARIABLES)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == \
        ["error: SLURM_CPUS_PER_TASK='two': expected a whole number >= 1 (on rank 1)"]
