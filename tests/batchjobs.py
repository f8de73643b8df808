"""The project's batch scripts (``batch/``) with a tiny model: what test_slurm and test_pbs share.

``tiny_env(tmp, steps, ckpt_every)``: the ``MPILM_*`` settings of ``batch/mpilm-env.sh`` for a
GPT of about ten thousand parameters on one small corpus file, on the CPU. ``finished(out, steps,
ranks)``: the run's ``summary.json``, checked to be complete. ``wait_for_checkpoint(out, step)``
blocks until a checkpoint of at least that step is complete.
"""

from __future__ import annotations

import json
import sysconfig
import time
from pathlib import Path

from conftest import ROOT

BATCH = ROOT / "batch"
TINY_MODEL = "--n-layer 1 --n-embd 16 --n-head 2 --block-size 16"
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"


def tiny_env(tmp: Path, steps: int, ckpt_every: int = 0, extra: str = "") -> dict[str, str]:
    return {"MPILM_MODEL": TINY_MODEL, "MPILM_BATCH_SIZE": "4", "MPILM_STEPS": str(steps),
            "MPILM_CKPT_EVERY": str(ckpt_every),
            "MPILM_ARGS": f"--data {CORPUS} --cache-dir {tmp / 'cache'} --device cpu --eval-batches 1 "
                          f"--log-every 50 --eval-every 100000 {extra}".strip()}


def finished(out: Path, steps: int, ranks: int) -> dict:
    summary_path = Path(out) / "summary.json"
    assert summary_path.is_file(), f"{out}: no summary.json (the run did not finish)"
    summary = json.loads(summary_path.read_text())
    assert summary["steps"] == steps and summary["world_size"] == ranks, summary
    return summary


def wait_for_checkpoint(out: Path, step: int, timeout: float = 120, alive=lambda: True) -> None:
    """Blocks until ``out/ckpt/step-<n>/DONE`` exists for some n >= step; AssertionError after
    ``timeout`` or once ``alive()`` turns false (the job ended first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [int(p.parent.name.split("-")[1]) for p in (Path(out) / "ckpt").glob("step-*/DONE")]
        if any(n >= step for n in done):
            return
        assert alive(), f"the run ended before writing a checkpoint of step >= {step}"
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint of step >= {step} in {out} after {timeout:g} s")
