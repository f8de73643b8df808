"""``python -m mpilm.bench allreduce`` end to end at tiny sizes: table, JSON rows, PNG, --tune.

The sweeps run as real ``mpirun -np 2`` jobs (``run_cli``) from serial tests; argument errors are
checked in-process. Speed is never asserted, only that the numbers exist and are consistent.
"""

from __future__ import annotations

import json

import pytest
import torch

from mpilm.bench.__main__ import main as bench_main
from mpilm.bench.allreduce import parse_bytes
from mpilm.comm import common, tuning
from mpilm.errors import UsageError

ROW_KEYS = {"size_bytes", "count", "dtype", "algorithm", "world_size", "time_us", "algbw_gbps", "busbw_gbps"}
SMALL = ["--min-bytes", "4K", "--max-bytes", "64K", "--factor", "4", "--iters", "2", "--warmup", "1"]


@pytest.fixture(autouse=True)
def restore_module_settings():
    """In-process runs set the tuning file, the ring segment size and torch's threads: put them back."""
    segment, threads = common.SEGMENT_BYTES, torch.get_num_threads()
    yield
    common.SEGMENT_BYTES = segment
    tuning.use_file(None)
    torch.set_num_threads(threads)


def test_sweep_writes_json_rows_and_plot(tmp_path, cli):
    out_json, out_png = tmp_path / "rows.json", tmp_path / "busbw.png"
    result = cli(["-m", "mpilm.bench", "allreduce", *SMALL, "--dtype", "bfloat16",
                      "--tuning-file", str(tmp_path / "none.json"),
                      "--json", str(out_json), "--plot", str(out_png)], np=2)
    assert result.returncode == 0, result.stderr
    assert "busbw(GB/s)" in result.stdout and "auto(" in result.stdout
    assert "smoke-test numbers" in result.stdout  # --iters 2 is flagged as not quotable
    rows = json.loads(out_json.read_text())
    assert {(r["size_bytes"], r["algorithm"]) for r in rows} == {
        (s, a) for s in (4096, 16384, 65536) for a in ("ring", "rhd", "tree", "mpi", "auto")}
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["world_size"] == 2 and row["dtype"] == "bfloat16"
        assert row["count"] * 2 == row["size_bytes"]
        assert row["time_us"] > 0
        assert row["algbw_gbps"] == pytest.approx(row["size_bytes"] / row["time_us"] / 1e3)
        assert row["busbw_gbps"] == pytest.approx(row["algbw_gbps"])  # 2(p-1)/p = 1 at p = 2
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shared_buffer_sweep_includes_shm(tmp_path, cli):
    out_json = tmp_path / "rows.json"
    result = cli(["-m", "mpilm.bench", "allreduce", *SMALL, "--algorithms", "shm,hier,ring,mpi", "--shared-buffer",
                  "--json", str(out_json)], np=2)
    assert result.returncode == 0, result.stderr
    assert "message in node shared memory" in result.stdout
    rows = json.loads(out_json.read_text())
    assert {r["algorithm"] for r in rows} == {"shm", "hier", "ring", "mpi"}
    assert all(r["buffer"] == "shared" and r["time_us"] > 0 for r in rows)


def test_tune_writes_thresholds_that_auto_then_uses(tmp_path, cli):
    path = tmp_path / "tuning.json"
    tuned = cli(["-m", "mpilm.bench", "allreduce", *SMALL, "--algorithms", "ring,tree,mpi",
                     "--tune", "--tuning-file", str(path)], np=2)
    assert tuned.returncode == 0, tuned.stderr
    assert "wrote auto thresholds" in tuned.stdout
    entries = tuning.read_file(path)["entries"]
    (key, entry), = entries.items()
    assert key.startswith("np2-") and key.endswith("-float32") and entry["world_size"] == 2
    assert {algorithm for _, algorithm in entry["rules"]} <= {"ring", "tree", "mpi"}

    out_json = tmp_path / "auto.json"
    used = cli(["-m", "mpilm.bench", "allreduce", *SMALL, "--algorithms", "auto",
                    "--tuning-file", str(path), "--json", str(out_json)], np=2)
    assert used.returncode == 0, used.stderr
    assert f"auto thresholds: {path} [float32]" in used.stdout
    for row in json.loads(out_json.read_text()):
        assert row["chose"] == tuning.pick(entry["rules"], row["size_bytes"])


@pytest.mark.parametrize("args,message", [
    (["--algorithms", "ring,nope"], "--algorithms nope: unknown"),
    (["--min-bytes", "4Q"], "--min-bytes 4Q: expected a size"),
    (["--min-bytes", "1M", "--max-bytes", "4K"], "--max-bytes 4K: smaller than --min-bytes"),
    (["--dtype", "int8"], "--dtype int8"),
    (["--factor", "1"], "--factor 1.0: must be > 1"),
    (["--iters", "0"], "--iters 0: must be >= 1"),
    (["--tune", "--algorithms", "auto"], "--tune: --algorithms names no candidate"),
    (["--dtype", "float64", "--min-bytes", "4"], "smaller than one float64 element"),
    (["--device", "cuda", "--tune"], "--device cuda with --tune: host buffers only"),
])
def test_bad_arguments_are_usage_errors(args, message, capsys):
    assert bench_main(["allreduce", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_unwritable_output_fails_before_timing(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert bench_main(["allreduce", *SMALL, "--json", str(blocker / "rows.json")]) == 2
    assert "--json" in capsys.readouterr().err


def test_single_rank_sweep_runs_in_process(tmp_path, capsys):
    out_json = tmp_path / "rows.json"
    assert bench_main(["allreduce", "--min-bytes", "4K", "--max-bytes", "4K", "--iters", "1", "--warmup", "0",
                       "--segment-bytes", "1K", "--tuning-file", str(tmp_path / "none.json"),
                       "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())
    assert [r["algorithm"] for r in rows] == ["ring", "rhd", "tree", "mpi", "auto"]
    assert "ring segment 1K" in capsys.readouterr().out


def test_parse_bytes_units():
    assert parse_bytes("4096", "--x") == 4096
    assert parse_bytes("4K", "--x") == 4096
    assert parse_bytes("256M", "--x") == 256 << 20
    assert parse_bytes("1G", "--x") == 1 << 30
    assert parse_bytes("64KiB", "--x") == 64 << 10
    assert parse_bytes("1.5K", "--x") == 1536
    for bad in ("", "K", "-4K", "0", "1.3"):
        with pytest.raises(UsageError):
            parse_bytes(bad, "--x")
