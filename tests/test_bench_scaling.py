"""The performance benches end to end at toy sizes: ``scaling`` (nested mpirun launches),
``ddp`` (DDP vs mpilm under mpirun -np 2, losses must match), ``model`` (alpha-beta fit and
predictions). They check what the benches compute and write, never how fast anything is.

Single-process benches run in this process through the same entry point as the command line
(``mpilm.bench.__main__.main``: exit status and ``error:`` lines included), which saves a Python
start-up each; ``ddp`` needs two ranks and runs under mpirun.
"""

import json
import math
import sysconfig
from pathlib import Path

import pytest

from conftest import run_cli
from mpilm.bench import model as cost_model
from mpilm.bench import scaling
from mpilm.bench.__main__ import main as bench_main
from mpilm.errors import UsageError

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "corpus.txt").write_bytes((stdlib / "argparse.py").read_bytes() + (stdlib / "typing.py").read_bytes())
    return ["--data", str(root / "corpus.txt"), "--cache-dir", str(root / "cache")]


def assert_ok(result):
    assert result.returncode == 0, (result.returncode, result.stdout[-3000:], result.stderr[-3000:])


def bench(argv, capsys):
    """Run ``python -m mpilm.bench ARGV`` in this process; returns (exit status, stdout, stderr)."""
    status = bench_main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------- scaling
def test_scaling_weak_launches_each_np_and_tabulates(tmp_path, corpus, capsys):
    out = tmp_path / "scaling.json"
    status, stdout, _ = bench(["scaling", "--np", "1,2", "--steps", "4", "--batch-size", "2", "--timeout", "240",
                               "--out", str(tmp_path / "runs"), "--json", str(out), "--plot", str(tmp_path / "scaling.png"),
                               "--", *TINY, *corpus], capsys)
    assert status == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["world_size"] for r in rows] == [1, 2]
    assert [r["batch_per_rank"] for r in rows] == [2, 2]  # weak: per-rank batch fixed
    assert rows[0]["speedup"] == 1 and rows[0]["efficiency"] == 1
    assert rows[1]["speedup"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["speedup"] / 2)
    assert rows[1]["busbw_gbps"] > 0 and rows[0]["busbw_gbps"] is None
    assert {"forward", "backward", "comm", "optimizer"} <= set(rows[1]["phases_ms"])
    run = json.loads((tmp_path / "runs" / "np2-r0" / "summary.json").read_text())  # tokens/s at the median step
    assert rows[1]["tokens_per_s"] == pytest.approx(2 * 2 * 16 / run["phases"]["step"]["p50"])
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert "efficiency" in stdout


def test_scaling_strong_splits_the_global_batch():
    assert [scaling.per_rank_batch("strong", 12, n) for n in (1, 2, 3, 4)] == [12, 6, 4, 3]
    assert scaling.per_rank_batch("weak", 12, 4) == 12
    with pytest.raises(UsageError, match="not divisible by 5"):
        scaling.per_rank_batch("strong", 12, 5)
    assert scaling.parse_np_list("4,1,2") == [1, 2, 4]
    for bad in ("0,2", "1,x", "2,2"):
        with pytest.raises(UsageError, match="--np"):
            scaling.parse_np_list(bad)


def test_scaling_refuses_options_it_owns_before_launching_anything(capsys):
    status, _, err = bench(["scaling", "--np", "1", "--", "--steps", "3"], capsys)
    assert status == 2 and "error: --steps after --" in err, err
    status, _, err = bench(["scaling", "--np", "1,2", "--mode", "strong", "--batch-size", "3"], capsys)
    assert status == 2 and "not divisible by 2" in err, err
    status, _, err = bench(["scaling", "--", "--n-head", "3"], capsys)  # train's own checks, before any launch
    assert status == 2 and "--n-embd 128 must be divisible by --n-head 3" in err, err


# ---------------------------------------------------------------- ddp
def test_ddp_and_mpilm_train_alike_and_are_compared(tmp_path, corpus):
    out = tmp_path / "ddp.json"
    result = run_cli(["-m", "mpilm.bench", "ddp", "--algorithms", "mpi,ring", "--warmup", "1", "--block-steps", "2",
                      "--check-steps", "4", "--json", str(out), "--plot", str(tmp_path / "ddp.png"),
                      "--ddp-bucket-mb", "0.01,25", "--overlap", "on,off", "--zero", "0,1",
                      "--", *TINY, "--batch-size", "4", "--steps", "5", "--bucket-mb", "0.01", *corpus],
                     np=2, timeout=300)
    assert_ok(result)
    doc = json.loads(out.read_text())
    assert doc["loss_check_ok"] and doc["backend"] == "gloo" and doc["world_size"] == 2
    rows = {r["runner"]: r for r in doc["rows"]}
    mpilm = [f"mpilm {a} {o}{z}" for a in ("mpi", "ring") for o in ("overlap", "no-overlap") for z in ("", " zero1")]
    assert list(rows) == ["ddp 0.01MB", "ddp 25MB", *mpilm]
    for row in rows.values():
        assert len(row["losses"]) == 5 and row["timed_steps"] == 4 and row["tokens_per_s"] > 0
        assert row["loss_max_abs_diff"] <= 1e-4
    ddp = rows["ddp 25MB"]
    assert ddp["comm_ms"] is None and ddp["comm_total_ms"] > 0  # DDP's comm hides in backward
    ring = rows["mpilm ring overlap"]
    assert ring["comm_ms"] > 0 and 0 <= ring["hidden_share"] <= 1 and ring["step_vs_bound"] > 0
    best_ddp = max(rows["ddp 0.01MB"]["tokens_per_s"], ddp["tokens_per_s"])
    assert ring["vs_ddp"] == pytest.approx(ring["tokens_per_s"] / best_ddp)
    # ZeRO-1 holds about half the optimizer state at 2 ranks
    assert rows["mpilm ring overlap zero1"]["optimizer_state_bytes"] < 0.6 * ring["optimizer_state_bytes"]
    assert (tmp_path / "ddp.png").stat().st_size > 0
    assert "loss check" in result.stdout and ": ok" in result.stdout


def test_ddp_bench_rejects_dropout_and_unknown_algorithms(capsys):
    status, _, err = bench(["ddp", "--", "--dropout", "0.1"], capsys)
    assert status == 2 and "error: --dropout 0.1" in err, err
    status, _, err = bench(["ddp", "--algorithms", "mpi,smoke-signals"], capsys)
    assert status == 2 and "error: --algorithms smoke-signals: unknown" in err, err
    status, _, err = bench(["ddp", "--overlap", "maybe"], capsys)
    assert status == 2 and "error: --overlap maybe" in err, err
    status, _, err = bench(["ddp", "--algorithms", "tree", "--zero", "1"], capsys)
    assert status == 2 and "error: --zero 1 with --allreduce tree" in err, err
    status, _, err = bench(["ddp", "--ddp-bucket-mb", "0"], capsys)
    assert status == 2 and "error: --ddp-bucket-mb 0" in err, err


# ---------------------------------------------------------------- model
ALPHA_BETA = {"ring": (5e-6, 1 / 5e9), "rhd": (4e-6, 1 / 4.5e9), "tree": (3e-6, 1 / 4e9), "mpi": (2e-6, 1 / 6e9)}


SWITCH = {"ring": 20e-6, "rhd": 15e-6, "tree": 10e-6, "mpi": 5e-6}  # seconds per core switch


def synthetic_rows(world_sizes=(2, 3, 4), cores=None, switch=False):
    """bench allreduce rows that follow the model exactly (with ``cores``: ranks sharing that many
    cores, and with ``switch`` paying SWITCH per core switch)."""
    rows = []
    for p in world_sizes:
        for algorithm, (alpha, beta) in ALPHA_BETA.items():
            for size in (4096 * 4**k for k in range(7)):
                seconds = cost_model.predict_seconds(algorithm, p, size, alpha, beta, cores,
                                                     SWITCH[algorithm] if switch else 0.0)
                rows.append({"size_bytes": size, "count": size // 4, "dtype": "float32", "algorithm": algorithm,
                             "world_size": p, "time_us": seconds * 1e6, "algbw_gbps": 0.0, "busbw_gbps": 0.0})
    return rows


def test_cost_terms_follow_the_algorithms():
    n = 1000.0
    assert cost_model.cost_terms("ring", 4, n) == (6, 1500)
    assert cost_model.cost_terms("rhd", 4, n) == (4, 1500)
    assert cost_model.cost_terms("rhd", 3, n) == (4, 3000)  # fold-in: p' = 2, plus 2 messages and 2n
    assert cost_model.cost_terms("tree", 8, n) == (3, 3000)
    assert cost_model.cost_terms("topk", 5, 80) == (4, 320)
    assert cost_model.cost_terms("gtopk", 8, 80) == (3, 240)
    assert cost_model.cost_terms("ring", 1, n) == (0, 0)
    assert cost_model.bucket_sizes(10, 4) == [4, 4, 2] and cost_model.bucket_sizes(8, 4) == [4, 4]


def test_cost_phases_count_the_busy_ranks():
    n = 1000.0
    assert cost_model.cost_phases("ring", 3, n) == [(4, 4000 / 3, 3)]
    # p = 3: rank 0 folds into rank 1 (2 busy), then ranks 1 and 2 run the p' = 2 core (2 busy)
    assert cost_model.cost_phases("rhd", 3, n) == [(2, 2000, 2), (2, 1000, 2)]
    assert cost_model.cost_phases("tree", 6, n) == [(2, 2000, 4), (2, 2000, 4)]
    assert cost_model.cost_phases("mpi", 4, n) == [(4, 1500, 4)]
    assert cost_model.cost_phases("ring", 1, n) == []
    for algorithm in ("ring", "rhd", "tree", "mpi", "topk", "gtopk"):
        for p in range(1, 10):
            phases = cost_model.cost_phases(algorithm, p, n)
            assert cost_model.cost_terms(algorithm, p, n) == (sum(m for m, _, _ in phases), sum(b for _, b, _ in phases))
            assert all(busy <= p for _, _, busy in phases)


def test_units():
    assert cost_model.parse_seconds("2us", "--alpha") == pytest.approx(2e-6)
    assert cost_model.parse_seconds("1.5ms", "--alpha") == pytest.approx(1.5e-3)
    assert cost_model.parse_seconds("3e-6", "--alpha") == pytest.approx(3e-6)
    assert cost_model.parse_rate("25GB/s", "--bandwidth") == pytest.approx(25e9)
    assert cost_model.parse_rate("100Gb/s", "--bandwidth") == pytest.approx(12.5e9)
    assert cost_model.parse_rate("1GiB/s", "--bandwidth") == pytest.approx(2**30)
    for bad in ("fast", "2 parsecs"):
        with pytest.raises(UsageError):
            cost_model.parse_seconds(bad, "--alpha")
        with pytest.raises(UsageError):
            cost_model.parse_rate(bad, "--bandwidth")


def test_model_fits_on_two_ranks_and_predicts_three_and_four(tmp_path, capsys):
    src = tmp_path / "allreduce.json"
    src.write_text(json.dumps(synthetic_rows()))
    out = tmp_path / "model.json"
    status, stdout, _ = bench(["model", "--from", str(src), "--fit-np", "2", "--compute-ms", "40",
                               "--grad-bytes", "64M", "--max-np", "1024", "--json", str(out),
                               "--plot", str(tmp_path / "model.png")], capsys)
    assert status == 0 and "held out" in stdout
    doc = json.loads(out.read_text())
    for algorithm, (alpha, beta) in ALPHA_BETA.items():
        fitted = doc["fits"][algorithm]
        assert fitted["alpha_s"] == pytest.approx(alpha, rel=1e-6)
        assert fitted["beta_s_per_byte"] == pytest.approx(beta, rel=1e-6)
    held_out = [v for v in doc["validation"] if not v["in_fit"]]
    assert {v["world_size"] for v in held_out} == {3, 4}
    assert all(v["max_abs_error"] < 1e-6 for v in doc["validation"])
    predictions = doc["predictions"]
    assert [r["world_size"] for r in predictions] == [2**k for k in range(1, 11)]
    for row in predictions:
        assert set(row["algorithms"]) == {"ring", "rhd", "tree", "topk", "gtopk"}
        effs = {a: v["efficiency"] for a, v in row["algorithms"].items()}
        assert all(0 < e <= 1 for e in effs.values())
        assert row["best"] == max(effs, key=effs.get)
        assert row["best_dense"] == max(("ring", "rhd", "tree"), key=effs.get)
    # top-k's allgather grows with N (until it goes dense), gtop-k's rounds only with lg N
    assert predictions[0]["best"] in ("topk", "gtopk") and predictions[-1]["best"] == "gtopk"
    last = predictions[-1]["algorithms"]
    assert last["topk"]["step_ms"] == pytest.approx(last["ring"]["step_ms"])  # 1024 ranks: top-k went dense
    assert doc["wins"] and (tmp_path / "model.png").stat().st_size > 0


def test_contention_is_the_busy_ranks_on_the_fullest_core():
    # a core per rank, or every rank busy: ceil(busy / cores)
    assert cost_model.contention(2, 2, 2) == 1 and cost_model.contention(8, 8, None) == 1
    assert cost_model.contention(3, 3, 2) == 2 and cost_model.contention(4, 4, 2) == 2
    assert cost_model.contention(5, 5, 2) == 3 and cost_model.contention(2, 2, 1) == 2
    # 2 busy of 3 ranks on 2 cores: the pair that shares a core is the busy pair 1 time in 3
    assert cost_model.contention(3, 2, 2) == pytest.approx(1 / 3 * 2 + 2 / 3 * 1)
    # 4 busy of 5 on cores of 3 and 2 ranks: max 3 (prob 2/5), else 2
    assert cost_model.contention(5, 4, 2) == pytest.approx(2 / 5 * 3 + 3 / 5 * 2)
    assert cost_model.contention(5, 1, 2) == 1


def test_shared_terms_stretch_each_phase_and_count_switches():
    n = 1000.0
    assert cost_model.shared_terms("ring", 4, n, None) == (6, 1500, 0)
    # every phase of a 4-rank ring has 4 busy ranks: 2 per core, one switch per message
    assert cost_model.shared_terms("ring", 4, n, 2) == (12, 3000, 6)
    # a 3-rank tree has 2 busy ranks in each phase: stretched by 4/3
    a, b, w = cost_model.shared_terms("tree", 3, n, 2)
    assert (a, b, w) == (pytest.approx(3 * 4 / 3), pytest.approx(3000 * 4 / 3), pytest.approx(3 / 3))
    # everything on one core: a 2-rank exchange takes twice as long plus a switch per message
    assert cost_model.shared_terms("rhd", 2, n, 1) == (4, 2000, 2)
    assert cost_model.predict_seconds("rhd", 2, n, 1e-6, 1e-9, cores=1, switch=3e-6) == pytest.approx(4e-6 + 2e-6 + 6e-6)


def test_fit_models_ranks_time_sharing_cores():
    """Measured on 2 cores, rows made with the contention model: --cores 2 recovers alpha and beta,
    and rows pinned to one core the switch time."""
    ring = [r for r in synthetic_rows(cores=2, switch=True) if r["algorithm"] == "ring"]
    alpha, beta = cost_model.fit(ring, "ring", cores=2, switch=SWITCH["ring"])
    assert (alpha, beta) == (pytest.approx(ALPHA_BETA["ring"][0], rel=1e-6), pytest.approx(ALPHA_BETA["ring"][1], rel=1e-6))
    assert cost_model.fit(ring, "ring")[0] != pytest.approx(alpha, rel=1e-3)  # without it the fit is off
    pinned = [r for r in synthetic_rows(world_sizes=(2,), cores=1, switch=True) if r["algorithm"] == "ring"]
    assert cost_model.fit_switch(pinned, "ring", alpha, beta) == pytest.approx(SWITCH["ring"], rel=1e-6)
    unpinned = [r for r in synthetic_rows(world_sizes=(2,)) if r["algorithm"] == "ring"]
    assert cost_model.fit_switch(unpinned, "ring", alpha, beta) == 0  # not slower than 2 x a core each: no switch


def test_model_with_cores_shows_the_plain_model_beside(tmp_path, capsys):
    src = tmp_path / "allreduce.json"
    src.write_text(json.dumps(synthetic_rows(cores=2, switch=True)))
    pinned = tmp_path / "allreduce-one-core.json"
    pinned.write_text(json.dumps(synthetic_rows(world_sizes=(2,), cores=1, switch=True)))
    out = tmp_path / "model.json"
    status, stdout, _ = bench(["model", "--from", str(src), "--fit-np", "2", "--cores", "2",
                               "--shared-core-from", str(pinned), "--compute-ms", "40",
                               "--grad-bytes", "4M", "--max-np", "8", "--json", str(out)], capsys)
    assert status == 0 and "plain median" in stdout and "switch us" in stdout
    doc = json.loads(out.read_text())
    assert doc["cores"] == 2
    for algorithm, switch in SWITCH.items():
        assert doc["fits"][algorithm]["switch_s"] == pytest.approx(switch, rel=1e-6)
    assert all(v["max_abs_error"] < 1e-6 for v in doc["validation"])  # the rows follow the corrected model
    plain = {(v["algorithm"], v["world_size"]): v["median_abs_error"] for v in doc["plain"]["validation"]}
    assert plain[("ring", 2)] < 1e-6 and plain[("ring", 3)] > 0.4  # plain: fits np 2, misses the shared cores
    # the predictions assume a core per rank: no contention, no switches
    ring8 = doc["predictions"][2]["algorithms"]["ring"]
    alpha, beta = ALPHA_BETA["ring"]
    assert ring8["comm_ms"] == pytest.approx(cost_model.predict_seconds("ring", 8, 4 * 2**20, alpha, beta) * 1e3, rel=1e-6)
    for argv, message in ((["--cores", "0"], "--cores 0: must be >= 1"),
                          (["--shared-core-from", str(pinned)], "pass --from and --cores too"),
                          (["--cores", "2", "--shared-core-from", str(tmp_path / "none.json")], "no such file")):
        status, _, err = bench(["model", "--from", str(src), *argv, "--compute-ms", "40", "--grad-bytes", "4M"], capsys)
        assert status == 2 and message in err, (argv, err)


def test_repeated_runs_count_at_their_median(tmp_path, capsys):
    rows = [r for r in synthetic_rows(world_sizes=(2,)) if r["algorithm"] == "ring"]
    slowed = [dict(r, time_us=r["time_us"] * 5) for r in rows]  # a run disturbed by something else on the machine
    for name, run in (("a", rows), ("b", rows), ("c", slowed)):
        (tmp_path / f"allreduce-{name}.json").write_text(json.dumps(run))
    merged = cost_model.merge_repeats(rows + rows + slowed)
    assert len(merged) == len(rows) and all(m["repeats"] == 3 for m in merged)
    assert [m["time_us"] for m in merged] == [r["time_us"] for r in rows]
    out = tmp_path / "model.json"
    status, _, _ = bench(["model", "--from", f"{tmp_path}/allreduce-*.json", "--compute-ms", "40", "--grad-bytes", "4M",
                          "--max-np", "4", "--json", str(out)], capsys)
    assert status == 0
    doc = json.loads(out.read_text())
    assert doc["fits"]["ring"]["alpha_s"] == pytest.approx(ALPHA_BETA["ring"][0], rel=1e-6)
    assert all(q["repeats"] == 3 for q in doc["validation"][0]["points"])
    status, _, err = bench(["model", "--from", f"{tmp_path}/nothing-*.json", "--compute-ms", "40", "--grad-bytes", "4M"],
                           capsys)
    assert status == 2 and "no file matches" in err, err


def test_model_with_a_given_network_and_a_run_summary(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"compute_s_per_step": 0.05, "gradient_bytes": 100 * 2**20}))
    (run_dir / "config.json").write_text(json.dumps({"bucket_mb": 25.0}))
    out = tmp_path / "model.json"
    status, _, _ = bench(["model", "--from-summary", str(run_dir / "summary.json"), "--alpha", "2us",
                          "--bandwidth", "25GB/s", "--max-np", "64", "--json", str(out)], capsys)
    assert status == 0
    doc = json.loads(out.read_text())
    assert doc["workload"] == {"compute_s": 0.05, "gradient_bytes": 100 * 2**20, "bucket_bytes": 25 * 2**20}
    ring = doc["predictions"][2]["algorithms"]["ring"]  # N = 8: 4 buckets of 25 MiB
    expected = 4 * (14 * 2e-6 + 2 * 7 / 8 * 25 * 2**20 / 25e9)
    assert ring["comm_ms"] == pytest.approx(expected * 1e3)
    assert ring["efficiency"] == pytest.approx(0.05 / (0.05 + expected))
    assert not math.isnan(doc["predictions"][-1]["algorithms"]["tree"]["step_ms"])


def test_model_needs_a_compute_time_and_something_to_fit(tmp_path, capsys):
    status, _, err = bench(["model", "--alpha", "2us", "--bandwidth", "25GB/s", "--grad-bytes", "4M"], capsys)
    assert status == 2 and "--compute-ms" in err, err
    status, _, err = bench(["model", "--compute-ms", "5", "--grad-bytes", "4M"], capsys)
    assert status == 2 and "nothing to fit" in err, err
    (tmp_path / "bad.json").write_text("{}")
    status, _, err = bench(["model", "--from", str(tmp_path / "bad.json"), "--compute-ms", "5", "--grad-bytes", "4M"], capsys)
    assert status == 2 and "expected the row list" in err, err
