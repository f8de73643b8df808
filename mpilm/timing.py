"""Where each training step's time goes, per rank: phase timers, a Chrome trace, run metrics.

- ``PhaseTimer``: phases data, forward, backward, compress, comm, optimizer per step. ``comm`` is
  the *exposed* time the training loop waited on communication; ``comm_total`` (credited with
  ``add``) is all time spent in collectives wherever it ran, so overlap reads ``comm_total - comm``.
  Time inside a step but outside every phase is reported as ``other``, so the table adds up to
  the step time. With a ``traffic`` counter (``.sent``/``.received`` bytes, e.g.
  ``mpilm.comm.world.traffic``) each step also records the bytes this rank sent and received.
  On CPU a phase is timed with ``perf_counter``. On CUDA each phase records a pair of CUDA events
  and nothing synchronizes in the hot path: ``flush()`` (called at log steps) waits for the last
  event once and converts every pending pair to seconds. The step total is host time on both.
- ``Tracer``: Chrome trace-event JSON (opens in Perfetto or chrome://tracing) of the first
  ``max_steps`` steps of every rank: one process per rank, one track per phase group, one for the
  collectives and one for compression. Clocks are aligned by a Barrier at start (``start``), after
  which every rank stamps events with its own ``perf_counter`` offset from that moment, so the
  skew between ranks is the Barrier's exit skew (microseconds on one node; more across nodes,
  and clock drift adds to it on long traces). Communication code reports per-bucket events
  through ``traced(...)``, which costs one global lookup when no tracer is active; the
  compressors' arithmetic, carved out of the comm phase (``PhaseTimer.carve``), lands on the
  compression track with the args of the bucket it belongs to.
- ``run_metrics``: the end-of-run figures (tokens/s, model FLOP/s, MFU from a table of bf16 dense
  peaks, bytes per step, bus bandwidth, comm/compute ratio) from per-step means.

Not here: any MPI beyond calling ``Barrier``/``bcast``/``gather`` on a communicator handed in
(the trainer averages over ranks), printing policy, anything about models.

Limits: CUDA trace events are device times mapped onto the host clock through one anchor event
(one device sync at the start of the first traced step); events that ``traced`` stamps are host
times, so for asynchronous CUDA work they show when the host launched or waited, not when the
kernel ran. Only steps ``[0, max_steps)`` are traced, which bounds memory and file size.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mpilm.errors import UsageError

PHASES = ("data", "forward", "backward", "compress", "comm", "optimizer")
# keys of a step record that are not times
_NOT_TIMES = ("step", "total", "bytes_sent", "bytes_received")


class PhaseTimer:
    def __init__(self, device: torch.device | str = "cpu", traffic=None, tracer: Tracer | None = None):
        self.cuda = torch.device(device).type == "cuda"
        self.traffic = traffic
        self.tracer = tracer
        self.steps: list[dict] = []  # one dict per finished step: phase -> seconds, plus "step", "total"
        self.phase_names: list[str] = list(PHASES)  # names timed by phase(); others came from add()
        self._current: dict = defaultdict(float)
        self._pending: list[_Pending] = []  # CUDA events not yet resolved
        self._step_start = None
        self._step = None
        self._traffic_start = (0, 0)
        self._anchor = None  # (CUDA event, host seconds) mapping device times onto the host clock

    # ---- one step
    def begin_step(self, step: int) -> None:
        self._step = step
        self._current = defaultdict(float)
        if self.traffic is not None:
            self._traffic_start = (self.traffic.sent, self.traffic.received)
        if self.tracer is not None:
            self.tracer.begin_step(step)
            if self.cuda and self._anchor is None and self.tracer.recording:
                self._anchor = _cuda_anchor()  # before the first traced event, so offsets are >= 0
        self._step_start = time.perf_counter()

    def end_step(self) -> dict:
        # the working dict becomes the record, so CUDA events still pending resolve into it
        end = time.perf_counter()
        record = self._current
        record["step"] = self._step
        record["total"] = end - self._step_start
        if self.traffic is not None:
            record["bytes_sent"] = self.traffic.sent - self._traffic_start[0]
            record["bytes_received"] = self.traffic.received - self._traffic_start[1]
        if self.tracer is not None:
            self.tracer.span("step", f"step {self._step}", self._step_start, end)
        self.steps.append(record)
        return record

    def phase(self, name: str):
        """``with timer.phase("forward"):`` times the block as ``name``."""
        trace = (phase_track(name), {}) if self.tracer is not None and self.tracer.recording else None
        return self._timed(name, None, trace)

    def carve(self, name: str, parent: str):
        """A sub-phase inside the open phase ``parent``: its time counts as ``name``, not ``parent``.

        The compressors use it for their own arithmetic (select, pack, accumulate, cast) inside
        the exposed ``comm`` phase, so ``compress`` and ``comm`` stay disjoint and still add up.
        Traced on the "compression" track with the args (bucket, bytes, algorithm) of the
        enclosing ``traced`` span, i.e. of the bucket being reduced.
        """
        trace = None
        if self.tracer is not None and self.tracer.recording:
            trace = ("compression", self.tracer.open_args())
        return self._timed(name, parent, trace)

    @contextmanager
    def _timed(self, name: str, parent: str | None, trace: tuple | None):
        """Time the block as ``name`` (and, when carving, take the same time off ``parent``);
        ``trace`` = (track, args) records it on the tracer too."""
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
                self._pending.append(_Pending(self._current, name, parent, start, end, step, trace))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                t1 = time.perf_counter()
                self._current[name] += t1 - t0
                if parent is not None:
                    self._current[parent] -= t1 - t0
                if trace is not None:
                    self.tracer.add(trace[0], name, t0, t1, step, **trace[1])

    def add(self, name: str, seconds: float) -> None:
        """Credit time measured elsewhere (e.g. ``comm_total`` from the communication code)."""
        self._current[name] += seconds

    def flush(self) -> None:
        """Resolve CUDA event pairs into seconds. Syncs the device once; call only at log steps."""
        if not self._pending:
            return
        self._pending[-1].end.synchronize()  # device sync: waits for the last recorded phase
        for p in self._pending:
            seconds = p.start.elapsed_time(p.end) / 1e3
            p.record[p.name] = p.record.get(p.name, 0.0) + seconds
            if p.parent is not None:
                p.record[p.parent] = p.record.get(p.parent, 0.0) - seconds
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
        comm_total_s, bytes_sent, bytes_received."""
        steps = self._measured(skip_first)
        if not steps:
            return {k: 0.0 for k in ("step_s", "compute_s", "comm_s", "comm_total_s", "bytes_sent", "bytes_received")}

        def mean(key):
            return statistics.fmean(s.get(key, 0.0) for s in steps)

        return {
            "step_s": mean("total"),
            "compute_s": statistics.fmean(sum(s.get(p, 0.0) for p in self.phase_names if p != "comm") for s in steps),
            "comm_s": mean("comm"),
            "comm_total_s": mean("comm_total"),
            "bytes_sent": mean("bytes_sent"),
            "bytes_received": mean("bytes_received"),
        }


@dataclass
class _Pending:
    """A CUDA-timed block waiting for ``flush``: where its seconds go, and its trace event."""

    record: dict  # the step record (the working dict, which becomes the record at end_step)
    name: str
    parent: str | None  # carve: the phase the same seconds are taken off
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
    header = f"{'phase':<12}{'mean ms':>10}{'p50 ms':>10}{'p95 ms':>10}{'share':>8}"

    def row(name, s, share):
        return f"{name:<12}{s['mean'] * 1e3:>10.2f}{s['p50'] * 1e3:>10.2f}{s['p95'] * 1e3:>10.2f}{share:>8.1%}"

    names = [n for n in summary if n != "step"]
    split = names.index("other") + 1 if "other" in names else len(names)
    lines = [header, *(row(n, summary[n], summary[n]["share"]) for n in names[:split])]
    lines.append(row("step", summary["step"], 1.0))
    lines.extend(row(n, summary[n], summary[n]["share"]) + "  (overlaps the phases)" for n in names[split:])
    return "\n".join(lines)


# ---------------------------------------------------------------- trace
TRACKS = ("step", "compute", "grad sync", "communication", "compression")
_PHASE_TRACKS = {"compress": "grad sync", "comm": "grad sync"}
_active: Tracer | None = None


def phase_track(name: str) -> str:
    """The trace track of a phase: compress and exposed comm on "grad sync", the rest "compute"."""
    return _PHASE_TRACKS.get(name, "compute")


def active_tracer() -> Tracer | None:
    """The tracer of the running training job, if it traces; None otherwise."""
    return _active


class _Span:
    """Context manager stamping one event on the active tracer (see ``traced``)."""

    __slots__ = ("tracer", "track", "name", "args", "t0")

    def __init__(self, tracer, track, name, args):
        self.tracer, self.track, self.name, self.args = tracer, track, name, args

    def __enter__(self):
        self.tracer._open.append(self.args)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        t1 = time.perf_counter()
        self.tracer._open.pop()
        self.tracer.span(self.track, self.name, self.t0, t1, **self.args)
        return False


class _NoSpan:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_SPAN = _NoSpan()


def traced(track: str, name: str, **args):
    """``with traced("communication", "allreduce ring", bucket=3, bytes=n, algorithm="ring"):``
    records one event (host time) on the active tracer; a shared no-op when none is active or
    the current step is past the traced range."""
    tracer = _active
    if tracer is None or not tracer.recording:
        return _NO_SPAN
    return _Span(tracer, track, name, args)


class Tracer:
    """Collects this rank's trace events; ``finish`` merges every rank's into one file on rank 0."""

    def __init__(self, rank: int, max_steps: int = 20):
        if max_steps < 1:
            raise ValueError(f"Tracer: max_steps={max_steps}: must be >= 1")
        self.rank = rank
        self.max_steps = max_steps
        self.events: list[dict] = []
        self.origin = time.perf_counter()
        self.recording = False
        self.step = None
        self._open: list[dict] = []  # args of the ``traced`` spans now open, innermost last

    def open_args(self) -> dict:
        """The args of the innermost open ``traced`` span (e.g. the bucket being reduced), or {}."""
        return dict(self._open[-1]) if self._open else {}

    def start(self, comm, path: str) -> None:
        """Collective: check ``path`` is writable (rank 0), align clocks, become the active tracer.

        Raises UsageError on every rank when rank 0 cannot write ``path``.
        """
        global _active
        problem = None
        if comm.Get_rank() == 0:
            target = Path(path).expanduser()
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "a"):
                    pass
            except OSError as err:
                problem = f"--trace {path}: cannot write there ({err.strerror or err})"
        problem = comm.bcast(problem, root=0)  # once per run: every rank learns rank 0's verdict
        if problem:
            raise UsageError(problem)
        comm.Barrier()  # SYNC: all ranks leave together; each measures from this instant
        self.origin = time.perf_counter()
        _active = self

    def begin_step(self, step: int) -> None:
        self.step = step
        self.recording = step < self.max_steps

    def span(self, track: str, name: str, t0: float, t1: float, **args) -> None:
        """One complete event from host ``perf_counter`` times, if the current step is traced."""
        if self.recording:
            self.add(track, name, t0, t1, self.step, **args)

    def add(self, track: str, name: str, t0: float, t1: float, step: int, **args) -> None:
        self.events.append({
            "name": name, "cat": track, "ph": "X", "pid": self.rank, "tid": TRACKS.index(track),
            "ts": round((t0 - self.origin) * 1e6, 3), "dur": round(max(0.0, t1 - t0) * 1e6, 3),
            "args": {"step": step, **args},
        })

    def finish(self, comm, path: str) -> str | None:
        """Collective: stop tracing, gather every rank's events to rank 0, which writes ``path``.

        Returns the path on rank 0, None elsewhere. Once per run, so the pickle-based gather is
        fine; its size is bounded by ``max_steps``.
        """
        global _active
        if _active is self:
            _active = None
        self.recording = False
        per_rank = comm.gather(self.events, root=0)  # SYNC: blocks until every rank sent its events
        if comm.Get_rank() != 0:
            return None
        meta = []
        for r in range(len(per_rank)):
            meta.append({"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"rank {r}"}})
            meta.append({"name": "process_sort_index", "ph": "M", "pid": r, "args": {"sort_index": r}})
            for tid, track in enumerate(TRACKS):
                meta.append({"name": "thread_name", "ph": "M", "pid": r, "tid": tid, "args": {"name": track}})
                meta.append({"name": "thread_sort_index", "ph": "M", "pid": r, "tid": tid, "args": {"sort_index": tid}})
        events = sorted((e for rank_events in per_rank for e in rank_events), key=lambda e: (e["ts"], e["pid"]))
        document = {"traceEvents": meta + events, "displayTimeUnit": "ms",
                    "otherData": {"producer": "mpilm", "ranks": len(per_rank), "traced_steps": self.max_steps,
                                  "clock": "perf_counter offsets from a common Barrier exit, microseconds"}}
        target = Path(path).expanduser()
        target.write_text(json.dumps(document) + "\n")
        return str(target)


# ---------------------------------------------------------------- run metrics
# bf16 dense tensor-core peaks (FLOP/s, no sparsity) from the vendors' datasheets, matched in
# order against torch.cuda.get_device_name(); the more specific names come first.
PEAK_BF16_FLOPS = (
    (r"GH200", 989e12),
    (r"H200", 989e12),
    (r"H100.*NVL", 835e12),
    (r"H100.*PCIe", 756e12),
    (r"H100|H800", 989e12),
    (r"B200", 2250e12),
    (r"A100|A800", 312e12),
    (r"L40S", 362e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
)


def device_name(device: torch.device | str) -> str | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device)


def peak_flops(name: str | None) -> float | None:
    """Peak bf16 dense FLOP/s of one device named ``name``; None for CPUs and unknown devices."""
    if not name:
        return None
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, name):
            return flops
    return None


def run_metrics(stats: dict[str, float], *, world_size: int, tokens_per_step: int, flops_per_token: float,
                payload_bytes: int, device: torch.device | str = "cpu") -> dict:
    """End-of-run figures from per-step means averaged over ranks (``PhaseTimer.rank_stats``).

    ``tokens_per_step``: over all ranks; ``payload_bytes``: gradient bytes allreduced per step.
    busbw follows nccl-tests: payload / comm_total x 2(p-1)/p, the per-rank link traffic a
    bandwidth-optimal allreduce needs, comparable across world sizes and algorithms;
    ``wire_gbps`` is what this rank actually handed to MPI per second of collective time.
    MFU assumes one device per rank and the bf16 peak (training runs bf16 autocast on CUDA).
    """
    p = world_size
    step = stats["step_s"]
    tokens_per_s = tokens_per_step / step if step > 0 else 0.0
    model_flops = flops_per_token * tokens_per_s
    peak = peak_flops(device_name(device))
    comm_total = stats["comm_total_s"]
    moving = p > 1 and comm_total > 0
    return {
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_rank": tokens_per_s / p,
        "step_s_mean": step,
        "compute_s_per_step": stats["compute_s"],
        "comm_s_per_step": stats["comm_s"],
        "comm_total_s_per_step": comm_total,
        "comm_compute_ratio": stats["comm_s"] / stats["compute_s"] if stats["compute_s"] > 0 else 0.0,
        "comm_total_compute_ratio": comm_total / stats["compute_s"] if stats["compute_s"] > 0 else 0.0,
        "model_flops_per_s": model_flops,
        "peak_flops_per_device": peak,
        "mfu": model_flops / (peak * p) if peak else None,
        "gradient_bytes": payload_bytes,
        "bytes_sent_per_step": stats["bytes_sent"],
        "bytes_received_per_step": stats["bytes_received"],
        "busbw_gbps": payload_bytes * 2 * (p - 1) / p / comm_total / 1e9 if moving else None,
        "wire_gbps": stats["bytes_sent"] / comm_total / 1e9 if moving else None,
    }


def format_run_metrics(m: dict) -> str:
    """Two lines for the end of a run: throughput and compute, then communication."""
    mfu = f" | MFU {m['mfu']:.1%}" if m["mfu"] is not None else ""
    busbw = (f" | busbw {m['busbw_gbps']:.2f} GB/s (wire {m['wire_gbps']:.2f} GB/s)"
             if m["busbw_gbps"] is not None else "")
    return (f"throughput: {m['tokens_per_s']:,.0f} tok/s ({m['tokens_per_s_per_rank']:,.0f} per rank) | "
            f"model {_si(m['model_flops_per_s'])}FLOP/s{mfu}\n"
            f"communication: {_si(m['bytes_sent_per_step'])}B sent, {_si(m['bytes_received_per_step'])}B received "
            f"per step per rank{busbw} | comm/compute {m['comm_compute_ratio']:.2f} exposed, "
            f"{m['comm_total_compute_ratio']:.2f} total")


def _si(x: float) -> str:
    """1234567 -> '1.23 M' (SI prefixes; the unit follows)."""
    if not x or not math.isfinite(x):
        return f"{x or 0:.0f} "
    exponent = min(4, max(0, int(math.floor(math.log10(abs(x)) / 3))))
    return f"{x / 1000 ** exponent:.3g} {' kMGT'[exponent].strip()}"
