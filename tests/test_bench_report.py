"""``bench report``: one table, JSON and PNG from two tiny real training runs (np 1 and np 2), and
the sweeps it refuses. Serial test: the runs are real ``mpirun`` jobs (``run_cli``), the report
runs in this process through the command-line entry point."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from conftest import run_cli
from mpilm.bench import report
from mpilm.bench.__main__ import main as bench_main
from mpilm.errors import UsageError

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
        "--steps", "3", "--log-every", "3", "--eval-every", "3", "--eval-batches", "1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A weak sweep of two finished runs: runs/np1 and runs/np2."""
    root = tmp_path_factory.mktemp("report")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "corpus.txt").write_bytes((stdlib / "argparse.py").read_bytes())
    data = ["--data", str(root / "corpus.txt"), "--cache-dir", str(root / "cache")]
    for n in (1, 2):
        done = run_cli(["-m", "mpilm.train", *TINY, *data, "--out", str(root / "runs" / f"np{n}")], np=n, timeout=180)
        assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    return root / "runs"


def test_report_tabulates_two_runs_and_writes_json_and_png(sweep, capsys):
    status = bench_main(["report", str(sweep / "np2"), str(sweep / "np1")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "weak scaling" in out and "val loss" in out
    result = json.loads((sweep / "scaling-report.json").read_text())  # default: beside the runs
    assert result["kind"] == "weak" and result["model"]["n_embd"] == 16
    rows = result["rows"]
    assert [r["world_size"] for r in rows] == [1, 2] and [r["nodes"] for r in rows] == [1, 1]
    assert rows[0]["speedup"] == 1 and rows[0]["efficiency"] == 1
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["speedup"] / 2)
    assert rows[1]["comm_share"] > 0 and rows[0]["mfu"] is None  # CPU: no MFU
    for row, n in zip(rows, (1, 2)):
        summary = json.loads((sweep / f"np{n}" / "summary.json").read_text())
        assert row["final_val_loss"] == summary["final_val_loss"]
        assert row["run_dirs"] == [str(sweep / f"np{n}")]
    assert (sweep / "scaling-report.png").stat().st_size > 10_000
    table = out.splitlines()
    assert any(line.split()[:2] == ["2", "1"] for line in table)  # ranks, nodes


def test_report_refuses_unfinished_and_mismatched_runs(sweep, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(sweep / "np1", unfinished)
    (unfinished / "summary.json").unlink()
    assert bench_main(["report", str(sweep / "np1"), str(unfinished)]) == 2
    assert "no summary.json (the run did not finish)" in capsys.readouterr().err

    other = tmp_path / "other-model"
    shutil.copytree(sweep / "np2", other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "n_embd": 32}))
    assert bench_main(["report", str(sweep / "np1"), str(other)]) == 2
    assert "different models (n_embd: 16, 32)" in capsys.readouterr().err


def _run(n, batch, accum=1):
    return {"config": {"world_size": n, "batch_size": batch, "grad_accum": accum, "model": "gpt", "n_layer": 1,
                       "n_head": 2, "n_embd": 16, "block_size": 16}}


def test_sweep_kind_from_the_batches():
    assert report.sweep_kind([_run(1, 8), _run(2, 8), _run(4, 4, accum=2)]) == "weak"
    assert report.sweep_kind([_run(1, 8), _run(2, 4), _run(4, 1, accum=2)]) == "strong"
    assert report.sweep_kind([_run(2, 8), _run(2, 8)]) == "single"
    with pytest.raises(UsageError, match="neither a weak sweep"):
        report.sweep_kind([_run(1, 8), _run(2, 8), _run(4, 8, accum=4)])
    with pytest.raises(UsageError, match="not repeats of one point"):
        report.sweep_kind([_run(2, 8), _run(2, 4)])
