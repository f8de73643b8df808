"""Where each training step's time goes, per rank: phase timers and the phase table.

Does: ``PhaseTimer`` times the phases data, forward, backward, compress, comm, optimizer of each
step. ``comm`` is the *exposed* time the training loop waited on communication; ``comm_total``
(credited with ``add``) is all time spent in collectives wherever it ran, so overlap reads
``comm_total - comm``. Time inside a step but outside every phase is reported as ``other``, so
the table (``format_table``) adds up to the step time. With a ``traffic`` counter
(``.sent``/``.received`` bytes, and ``.shm_read``/``.shm_written`` where it counts them, e.g.
``mpilm.comm.world.traffic``) each step also records the bytes this rank sent and received and
read from / wrote into its node peers' shared memory. On CPU a phase is timed with ``perf_counter``. On CUDA each
phase records a pair of CUDA events and nothing synchronizes in the hot path: ``flush()``
(called at log steps) waits for the last event once and converts every pending pair to seconds.
The step total is host time on both. With a ``mpilm.trace.Tracer`` every timed phase of a traced
step also becomes a trace event (CUDA phases once flushed, mapped onto the host clock); the
reducers' own arithmetic is re-labelled from ``comm`` to ``compress`` with ``move`` (they trace
it themselves, on the "compression" track). ``rank_stats`` gives the per-step means that ``mpilm.metrics.run_metrics`` turns into the
end-of-run figures.

Threads: ``add`` may be called from any thread (the communication thread credits
``comm_total`` and per-bucket times): it takes a lock, as do the timer's own updates of the
step record. Its seconds land in the step open when it runs, so the other thread must be done
crediting a step before the main thread ends it (``wait()`` before the optimizer). Everything
else (``begin_step``, ``end_step``, ``phase``, ``move``, ``flush``, reporting) belongs to the
thread that drives the training loop.

Does not: write the trace (``mpilm.trace``) or compute run metrics (``mpilm.metrics``); any MPI
(the trainer averages ``rank_stats`` over ranks); printing policy; anything about models.

Limits: CUDA phase times are device times; in the trace they are mapped onto the host clock
through one anchor event (one device sync at the start of the first traced step), and the step
total stays host time, so on CUDA ``other`` is clamped at zero. Pending CUDA events grow until
the next ``flush``.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mpilm import trace

PHASES = ("data", "forward", "backward", "compress", "comm", "optimizer")
# keys of a step record that are not times
_TRAFFIC = ("sent", "received", "shm_read", "shm_written")  # counters read from ``traffic`` when it has them
_NOT_TIMES = ("step", "total", *(f"bytes_{name}" for name in _TRAFFIC))


class PhaseTimer:
    """Per-step phase times of one rank; ``add`` is the one method safe from other threads."""

    def __init__(self, device: torch.device | str = "cpu", traffic=None, tracer: trace.Tracer | None = None):
        self.cuda = torch.device(device).type == "cuda"
        self.traffic = traffic
        self.tracer = tracer
        self.steps: list[dict] = []  # one dict per finished step: phase -> seconds, plus "step", "total"
        self.phase_names: list[str] = list(PHASES)  # names timed by phase(); others came from add()
        self._current: dict = defaultdict(float)
        self._pending: list[_Pending] = []  # CUDA events not yet resolved
        self._step_start = None
        self._step = None
        self._traffic_start: dict[str, int] = {}
        self._anchor = None  # (CUDA event, host seconds) mapping device times onto the host clock
        self._lock = threading.Lock()  # guards _current and the records against add() from other threads

    # ---- one step
    def begin_step(self, step: int) -> None:
        self._step = step
        with self._lock:
            self._current = defaultdict(float)
        if self.traffic is not None:
            self._traffic_start = {k: getattr(self.traffic, k) for k in _TRAFFIC if hasattr(self.traffic, k)}
        if self.tracer is not None:
            self.tracer.begin_step(step)
            if self.cuda and self._anchor is None and self.tracer.recording:
                self._anchor = _cuda_anchor()  # before the first traced event, so offsets are >= 0
        self._step_start = time.perf_counter()

    def end_step(self) -> dict:
        # the working dict becomes the record, so CUDA events still pending resolve into it
        end = time.perf_counter()
        with self._lock:
            record = self._current
            record["step"] = self._step
            record["total"] = end - self._step_start
            if self.traffic is not None:
                for key, start in self._traffic_start.items():
                    record[f"bytes_{key}"] = getattr(self.traffic, key) - start
        if self.tracer is not None:
            self.tracer.span("step", f"step {self._step}", self._step_start, end)
        self.steps.append(record)
        return record

    def phase(self, name: str):
        """``with timer.phase("forward"):`` times the block as ``name``."""
        trace_as = (trace.phase_track(name), {}) if self.tracer is not None and self.tracer.recording else None
        return self._timed(name, trace_as)

    @contextmanager
    def _timed(self, name: str, trace_as: tuple | None):
        """Time the block as ``name``; ``trace_as`` = (track, args) records it on the tracer too."""
        if name not in self.phase_names:
            self.phase_names.append(name)
        step = self._step
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append(_Pending(self._current, name, start, end, step, trace_as))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                t1 = time.perf_counter()
                with self._lock:
                    self._current[name] += t1 - t0
                if trace_as is not None:
                    self.tracer.add(trace_as[0], name, t0, t1, step, **trace_as[1])

    def add(self, name: str, seconds: float) -> None:
        """Credit time measured elsewhere (e.g. ``comm_total`` from the communication code) to the
        step now open. Thread-safe: the communication thread calls it while the main thread times."""
        with self._lock:
            self._current[name] += seconds

    def move(self, seconds: float, source: str, dest: str) -> None:
        """Re-label ``seconds`` of the open step from phase ``source`` to ``dest`` (both still add up).

        The trainer uses it for the reducers' own arithmetic, which they time themselves, when it
        ran inside the exposed ``comm`` phase (no overlap): it counts as ``compress``, not ``comm``.
        """
        if dest not in self.phase_names:
            self.phase_names.append(dest)
        with self._lock:
            self._current[source] -= seconds
            self._current[dest] += seconds

    def flush(self) -> None:
        """Resolve CUDA event pairs into seconds. Syncs the device once; call only at log steps."""
        if not self._pending:
            return
        self._pending[-1].end.synchronize()  # device sync: waits for the last recorded phase
        for p in self._pending:
            seconds = p.start.elapsed_time(p.end) / 1e3
            with self._lock:
                p.record[p.name] = p.record.get(p.name, 0.0) + seconds
            if p.trace is not None:
                t0 = self._device_to_host(p.start)
                self.tracer.add(p.trace[0], p.name, t0, t0 + seconds, p.step, **p.trace[1])
        self._pending.clear()

    def _device_to_host(self, event) -> float:
        """Host ``perf_counter`` seconds at which a (completed) CUDA event ran on the device."""
        anchor, host = self._anchor
        return host + anchor.elapsed_time(event) / 1e3

    # ---- reporting
    def last(self, n: int) -> list[dict]:
        self.flush()
        return self.steps[-n:]

    def _measured(self, skip_first: int) -> list[dict]:
        self.flush()
        return self.steps[skip_first:] if len(self.steps) > skip_first else self.steps

    def summary(self, skip_first: int = 1) -> dict:
        """Per phase: mean, p50, p95 seconds and share of step time (first steps are warm-up).

        Rows: every phase, ``other`` (step time outside all phases), then times credited with
        ``add`` (``comm_total``), which overlap the phases and are not part of the sum.
        """
        steps = self._measured(skip_first)
        if not steps:
            return {}
        out = {"step": _stats([s["total"] for s in steps])}
        mean_total = out["step"]["mean"] or 1e-12
        credited = sorted({k for s in steps for k in s} - set(_NOT_TIMES) - set(self.phase_names))
        columns = {name: [s.get(name, 0.0) for s in steps] for name in self.phase_names}
        # on CUDA the phases are device times and the step is host time: clamp the rare negative rest
        columns["other"] = [max(0.0, s["total"] - sum(s.get(p, 0.0) for p in self.phase_names)) for s in steps]
        columns.update({name: [s.get(name, 0.0) for s in steps] for name in credited})
        for name, values in columns.items():
            out[name] = _stats(values)
            out[name]["share"] = out[name]["mean"] / mean_total
        return out

    def rank_stats(self, skip_first: int = 1) -> dict[str, float]:
        """This rank's per-step means after warm-up: the inputs of ``run_metrics`` (average them
        over ranks first). Keys: step_s, compute_s (every phase but exposed comm), comm_s,
        comm_total_s, bytes_sent, bytes_received, bytes_shm_read, bytes_shm_written."""
        steps = self._measured(skip_first)
        if not steps:
            return {k: 0.0 for k in ("step_s", "compute_s", "comm_s", "comm_total_s", *(f"bytes_{t}" for t in _TRAFFIC))}

        def mean(key):
            return statistics.fmean(s.get(key, 0.0) for s in steps)

        return {
            "step_s": mean("total"),
            "compute_s": statistics.fmean(sum(s.get(p, 0.0) for p in self.phase_names if p != "comm") for s in steps),
            "comm_s": mean("comm"),
            "comm_total_s": mean("comm_total"),
            **{f"bytes_{t}": mean(f"bytes_{t}") for t in _TRAFFIC},
        }


@dataclass
class _Pending:
    """A CUDA-timed block waiting for ``flush``: where its seconds go, and its trace event."""

    record: dict  # the step record (the working dict, which becomes the record at end_step)
    name: str
    start: object  # torch.cuda.Event pair
    end: object
    step: int
    trace: tuple | None  # (track, args) when the step is traced


def _cuda_anchor() -> tuple:
    """A CUDA event that ran at a known host time: maps device event times onto ``perf_counter``."""
    torch.cuda.synchronize()  # device sync, once per traced run: the queue is empty
    anchor = torch.cuda.Event(enable_timing=True)
    anchor.record()
    anchor.synchronize()  # device sync: the anchor ran at about this host instant
    return anchor, time.perf_counter()


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"mean": statistics.fmean(values), "p50": statistics.median(values), "p95": p95}


def format_table(summary: dict) -> str:
    """The end-of-run phase table (milliseconds and share of step time); the phase rows and
    ``other`` add up to ``step``; rows below it (``comm_total``) overlap the phases."""
    if not summary:  # e.g. resumed at the last step, or a run of one step: nothing after warm-up
        return "phases: no step measured in this run (the first step of a run is warm-up and left out)"
    header = f"{'phase':<12}{'mean ms':>10}{'p50 ms':>10}{'p95 ms':>10}{'share':>8}"

    def row(name, s, share):
        return f"{name:<12}{s['mean'] * 1e3:>10.2f}{s['p50'] * 1e3:>10.2f}{s['p95'] * 1e3:>10.2f}{share:>8.1%}"

    names = [n for n in summary if n != "step"]
    split = names.index("other") + 1 if "other" in names else len(names)
    lines = [header, *(row(n, summary[n], summary[n]["share"]) for n in names[:split])]
    lines.append(row("step", summary["step"], 1.0))
    lines.extend(row(n, summary[n], summary[n]["share"]) + "  (overlaps the phases)" for n in names[split:])
    return "\n".join(lines)
