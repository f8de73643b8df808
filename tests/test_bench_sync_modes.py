"""``bench sync-modes`` end to end at toy size: three rows (sync, async, diloco) launched by the
bench at np 2 on one token budget, their JSON, curves, ratios and table; and its usage errors,
all decided before anything is launched. It checks what the bench computes, never speed.
"""

import json
import sysconfig
from pathlib import Path

import pytest

from mpilm.bench import sync_modes
from mpilm.bench.__main__ import main as bench_main
from mpilm.errors import UsageError

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-batches", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync-modes-corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "corpus.txt").write_bytes((stdlib / "argparse.py").read_bytes() + (stdlib / "typing.py").read_bytes())
    return ["--data", str(root / "corpus.txt"), "--cache-dir", str(root / "cache")]


def bench(argv, capsys):
    status = bench_main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_four_modes_on_one_token_budget(tmp_path, corpus, capsys):
    out = tmp_path / "sync-modes.json"
    status, stdout, err = bench(["sync-modes", "--modes", "sync,async,async-ps2,diloco-2", "--steps", "4", "--eval-every", "2",
                                 "--timeout", "120", "--out", str(tmp_path / "runs"), "--json", str(out),
                                 "--plot", str(tmp_path / "sync-modes.png"), "--", *TINY, *corpus], capsys)
    assert status == 0, err
    doc = json.loads(out.read_text())
    assert doc["world_size"] == 2 and doc["async_steps"] == 8  # the server takes the 8 batches of sync's 4 steps
    rows = {r["mode"]: r for r in doc["rows"]["local"]}
    assert list(rows) == ["sync", "async", "async-ps2", "diloco-2"]
    budget = 4 * 2 * 4 * 16
    for name, row in rows.items():
        assert row["tokens"] == budget, name
        # evaluations on the same token counts in every row, the last one the summary's final val loss
        assert [p["tokens"] for p in row["curve"]] == [0, budget // 2, budget], name
        assert row["curve"][-1]["val_loss"] == pytest.approx(row["final_val_loss"], abs=1e-4)
        assert row["curve"][0]["t_s"] == 0 and row["curve"][-1]["t_s"] > 0
        assert row["wall_s"] > 0 and row["tokens_per_s"] == pytest.approx(budget / row["wall_s"])
        assert row["time_ratio"] == pytest.approx(row["wall_s"] / rows["sync"]["wall_s"])
        assert row["loss_ratio"] == pytest.approx(row["final_val_loss"] / rows["sync"]["final_val_loss"])
    sync, asynchronous = rows["sync"], rows["async"]
    assert sync["bytes_fewer"] == 1 and sync["reach_share"] == pytest.approx(1)
    # 2 workers (the same 2 computing ranks as sync's) and the server: 3 ranks
    assert asynchronous["world_size"] == 3 and rows["sync"]["world_size"] == 2
    assert asynchronous["steps"] == 8 and asynchronous["updates"] == 8 and asynchronous["dropped_gradients"] == 0
    assert sum(asynchronous["staleness_histogram"].values()) == 8 == sum(asynchronous["gradients_per_worker"].values())
    # every gradient costs G up and G back, with one server or sliced over two (on 4 ranks)
    for row in (asynchronous, rows["async-ps2"]):
        assert row["bytes_per_step"] == pytest.approx(2 * row["gradient_bytes"], rel=0.01)
    assert rows["async-ps2"]["world_size"] == 4 and rows["async-ps2"]["ps_ranks"] == 2
    assert rows["diloco-2"]["bytes_fewer"] == pytest.approx(sync["bytes_per_step"] / rows["diloco-2"]["bytes_per_step"])
    assert (tmp_path / "sync-modes.png").stat().st_size > 0
    assert "## link local: 2 ranks" in stdout and "x fewer" in stdout
    table = stdout[stdout.index("## link local"):]
    assert [line.split()[0] for line in table.splitlines()[3:7]] == ["sync", "async", "async-ps2", "diloco-2"]


def test_token_budget_and_evaluation_cadence():
    assert [sync_modes.async_steps(300, n) for n in (1, 2, 3)] == [300, 600, 900]  # the server's gradients in all
    modes = {m.name: m for m in sync_modes.parse_modes("sync,async,async-ps2,local-16,diloco-100,sync-topk")}
    assert [sync_modes.ranks_for(modes[m], 2) for m in ("sync", "async", "async-ps2", "diloco-100")] == [2, 3, 4, 2]
    assert modes["sync-topk"] == sync_modes.Mode("sync-topk", "sync", compress="topk")
    assert sync_modes.parse_modes("sync-sign") == [sync_modes.Mode("sync-sign", "sync", compress="sign")]
    assert sync_modes.parse_modes("async-pipe,async-ps3-pipe") == [
        sync_modes.Mode("async-pipe", "async", pipeline=True), sync_modes.Mode("async-ps3-pipe", "async", ps_ranks=3, pipeline=True)]
    assert [sync_modes.eval_every_for(modes[m], 50, 3) for m in ("sync", "async", "local-16", "diloco-100")] == [50, 150, 64, 100]


def test_reach_is_linear_between_evaluations():
    points = [{"t_s": 0.0, "val_loss": 5.0}, {"t_s": 10.0, "val_loss": 3.0}, {"t_s": 20.0, "val_loss": 2.0}]
    assert sync_modes.reach_time(points, 2.5) == pytest.approx(15.0)
    assert sync_modes.reach_time(points, 3.0) == pytest.approx(10.0)
    assert sync_modes.reach_time(points, 1.9) is None


@pytest.mark.parametrize("argv, message", [
    (["--modes", "sync,hogwild"], "--modes hogwild: unknown"),
    (["--modes", "sync,sync"], "a row is listed twice"),
    (["--modes", "sync,local-0"], "H must be >= 1"),
    (["--modes", "sync,diloco-3", "--steps", "10"], "--steps 10: not a multiple of diloco-3's H = 3"),
    (["--modes", "sync", "--", "--steps", "5"], "--steps after --: set per row"),
    (["--modes", "sync,async", "--", "--compress", "topk"], "--compress after --"),
    (["--link", "100mbit"], "--link 100mbit: only with --cluster"),
    (["--np", "1", "--modes", "sync,local-4"], "--np 1: the modes exchange between ranks"),
    (["--slow-rank", "2"], "--slow-rank 2: the jobs have 2 ranks"),
    (["--modes", "sync", "--", "--n-head", "3"], "--n-embd 128 must be divisible by --n-head 3"),
])
def test_usage_errors_before_any_launch(argv, message, capsys):
    status, _, err = bench(["sync-modes", *argv], capsys)
    assert status == 2 and message in err, err
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_repeats_pair_each_row_with_the_sync_run_of_its_repeat():
    def run(wall, end_loss):
        return {"wall_s": wall, "final_val_loss": end_loss,
                "curve": [{"t_s": 0.0, "val_loss": 5.0, "tokens": 0}, {"t_s": wall, "val_loss": end_loss, "tokens": 1}]}

    sync = {"mode": "sync", "bytes_per_step": 100.0, **run(10, 2.0), "by_repeat": {0: run(10, 2.0), 1: run(20, 2.0), 2: run(30, 2.0)}}
    fast = {"mode": "diloco-50", "bytes_per_step": 2.0, **run(10, 2.0),
            "by_repeat": {0: run(5, 2.0), 1: run(10, 2.0), 2: run(30, 2.0)}}  # the last repeat under a heavier load
    sync_modes.add_ratios([sync, fast])
    assert fast["time_ratio"] == pytest.approx(0.5) and fast["reach_share"] == pytest.approx(0.5)
    assert fast["bytes_fewer"] == pytest.approx(50) and sync["time_ratio"] == 1
