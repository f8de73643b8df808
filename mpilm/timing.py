"""Phase timers: where each training step's time goes, per rank.

Phases: data, forward, backward, compress, comm, optimizer. ``comm`` is the *exposed* time the
training loop waited on communication; ``comm_total`` (kept apart) is all time spent in
collectives wherever it ran, so overlap can be read off as ``comm_total - comm``.

On CPU a phase is timed with ``perf_counter``. On CUDA each phase records a pair of CUDA events
and nothing synchronizes in the hot path: ``flush()`` (called at log steps) waits for the last
event once and converts every pending pair to seconds.

Not here: anything about MPI (the trainer gathers per-rank records), printing policy.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

PHASES = ("data", "forward", "backward", "compress", "comm", "optimizer")


class PhaseTimer:
    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.steps: list[dict] = []  # one dict per finished step: phase -> seconds, plus "step", "total"
        self._current: dict = defaultdict(float)
        self._pending: list[tuple[dict, str, object, object]] = []  # CUDA events not yet resolved
        self._step_start = None
        self._step = None

    # ---- one step
    def begin_step(self, step: int) -> None:
        self._step = step
        self._current = defaultdict(float)
        self._step_start = time.perf_counter()

    def end_step(self) -> dict:
        # the working dict becomes the record, so CUDA events still pending resolve into it
        record = self._current
        record["step"] = self._step
        record["total"] = time.perf_counter() - self._step_start
        self.steps.append(record)
        return record

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((self._current, name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._current[name] += time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        """Credit time measured elsewhere (e.g. ``comm_total`` from the communication code)."""
        self._current[name] += seconds

    def flush(self) -> None:
        """Resolve CUDA event pairs into seconds. Syncs the device once; call only at log steps."""
        if not self._pending:
            return
        self._pending[-1][3].synchronize()  # device sync: waits for the last recorded phase
        for target, name, start, end in self._pending:
            target[name] = target.get(name, 0.0) + start.elapsed_time(end) / 1e3
        self._pending.clear()

    # ---- reporting
    def last(self, n: int) -> list[dict]:
        self.flush()
        return self.steps[-n:]

    def summary(self, skip_first: int = 1) -> dict:
        """Per phase: mean, p50, p95 seconds and share of step time (first steps are warm-up)."""
        self.flush()
        steps = self.steps[skip_first:] if len(self.steps) > skip_first else self.steps
        if not steps:
            return {}
        totals = [s["total"] for s in steps]
        out = {"step": _stats(totals)}
        mean_total = out["step"]["mean"] or 1e-12
        for name in (*PHASES, "comm_total", *sorted({k for s in steps for k in s} - set(PHASES) - {"step", "total", "comm_total"})):
            values = [s.get(name, 0.0) for s in steps]
            stats = _stats(values)
            stats["share"] = stats["mean"] / mean_total
            out[name] = stats
        return out


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"mean": statistics.fmean(values), "p50": statistics.median(values), "p95": p95}


def format_table(summary: dict) -> str:
    """The end-of-run phase table (milliseconds and share of step time)."""
    lines = [f"{'phase':<12}{'mean ms':>10}{'p50 ms':>10}{'p95 ms':>10}{'share':>8}"]
    for name, s in summary.items():
        if name == "step":
            continue
        lines.append(f"{name:<12}{s['mean'] * 1e3:>10.2f}{s['p50'] * 1e3:>10.2f}{s['p95'] * 1e3:>10.2f}{s['share']:>8.1%}")
    s = summary["step"]
    lines.append(f"{'step':<12}{s['mean'] * 1e3:>10.2f}{s['p50'] * 1e3:>10.2f}{s['p95'] * 1e3:>10.2f}{1:>8.0%}")
    return "\n".join(lines)
