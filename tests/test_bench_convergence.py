"""`bench convergence` end to end at a tiny size: rows for every variant, ratios against its family's dense run."""

import json
from pathlib import Path

import pytest
from mpi4py import MPI

from mpilm.bench.__main__ import main as bench_main

TINY = ["--steps", "6", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
        "--batch-size", "4", "--eval-every", "6", "--log-every", "2", "--eval-batches", "1"]


@pytest.mark.mpi(min_size=2)
def test_convergence_bench_writes_table_json_and_plot(tmp_path_factory):
    comm = MPI.COMM_WORLD
    root = Path(comm.bcast(str(tmp_path_factory.mktemp("conv")) if comm.rank == 0 else None))
    code = bench_main(["convergence", "--variants", "topk-10%,topk-10%-noef,adamw-topk-precondition-momentum",
                       "--out", str(root / "runs"), "--json", str(root / "c.json"), "--plot", str(root / "c.png"),
                       "--", *TINY])
    assert code == 0
    if comm.rank != 0:
        return
    rows = json.loads((root / "c.json").read_text())
    assert [r["variant"] for r in rows] == ["none", "topk-10%", "topk-10%-noef", "adamw-none",
                                            "adamw-topk-precondition-momentum"]
    assert [r["reference"] for r in rows] == ["none"] * 3 + ["adamw-none"] * 2
    for dense in (rows[0], rows[3]):
        assert dense["val_loss_vs_dense"] == 1.0 and dense["bytes_reduction"] == 1.0
    for r in rows[1:3] + rows[4:]:
        # the density warm-up starts at 25%, so over 6 steps top-k-10% saves less than 10x
        assert r["bytes_sent_per_step"] < rows[0]["bytes_sent_per_step"] and r["bytes_reduction"] > 1
        assert len(r["loss_curve"]) == 3 and r["compress_ms_per_step"] > 0
    assert (root / "c.png").stat().st_size > 10_000


def test_unknown_variant_is_a_usage_error():
    from mpilm.bench import convergence
    from mpilm.errors import UsageError

    with pytest.raises(UsageError, match="unknown topk-50%"):
        convergence.parse_variants("none,topk-50%")
    assert convergence.parse_variants("fp16") == ["none", "fp16"]
    assert convergence.parse_variants("adamw-topk-frozen,fp16") == ["none", "fp16", "adamw-none", "adamw-topk-frozen"]
    assert convergence.parse_variants("adamw") == list(convergence.ADAMW_VARIANTS)
