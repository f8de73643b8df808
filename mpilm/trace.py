"""A Chrome trace of the first training steps of every rank, safe to record from several threads.

Does: ``Tracer`` collects Chrome trace-event JSON (opens in Perfetto or chrome://tracing) of the
first ``max_steps`` steps of every rank: one process per rank, one lane (``tid``) per track of
``TRACKS`` for the events of the thread that drives the training loop (the tracer's owner: the
thread that built it or called ``start``): "step", "compute" and "grad sync" for the phases
(``phase_track``), "communication" for the collectives and "compression" for the compressors'
arithmetic (each reducer traces its own). Events recorded by any other thread (the communication
thread running bucket collectives while the main thread runs backward) go on a lane of that
thread instead, beside the main thread's: the first such thread gets the "comm thread" lane,
any further one a lane "thread <name>" after it (lanes are keyed by thread name, so a thread
restarted under the same name keeps its lane); the event's ``cat`` still names its track.
Clocks are aligned by a Barrier at start (``start``), after which every rank stamps events with
its own ``perf_counter`` offset from that moment, so the skew between ranks is the Barrier's exit
skew (microseconds on one node; more across nodes, and clock drift adds to it on long traces).
Communication code reports per-bucket events through ``traced(...)``, which costs one global
lookup when no tracer is active; ``Tracer.open_args`` gives the args of the calling thread's
innermost open ``traced`` span.

Threads: events are appended under a lock; the stack of open ``traced`` spans is per thread; a
span takes its step number when it opens. ``begin_step``, ``start`` and ``finish`` belong to the
owner thread; other threads must have closed their spans before ``finish`` (later events are
dropped from the file).

Does not: any MPI beyond calling ``Barrier``/``bcast``/``gather`` on a communicator handed in;
timing phases or reading CUDA events (``mpilm.timing`` converts those to host times and hands
them to ``add``); printing; anything about models.

Limits: events that ``traced`` stamps are host times, so for asynchronous CUDA work they show
when the host launched or waited, not when the kernel ran. Only steps ``[0, max_steps)`` are
traced, which bounds memory and file size.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from mpilm.errors import UsageError

TRACKS = ("step", "compute", "grad sync", "communication", "compression", "comm thread")
COMM_THREAD = "comm thread"  # the lane of the first thread other than the owner that records
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

    __slots__ = ("tracer", "track", "name", "args", "t0", "step")

    def __init__(self, tracer, track, name, args):
        self.tracer, self.track, self.name, self.args = tracer, track, name, args

    def __enter__(self):
        self.step = self.tracer.step
        self.tracer._open_stack().append(self.args)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        t1 = time.perf_counter()
        self.tracer._open_stack().pop()
        self.tracer.add(self.track, self.name, self.t0, t1, self.step, **self.args)
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
    records one event (host time) on the active tracer, from any thread; a shared no-op when
    none is active or the current step is past the traced range."""
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
        self._owner = threading.get_ident()  # the training loop's thread: its events use TRACKS' lanes
        self._lock = threading.Lock()  # guards events and _lanes
        self._lanes: dict[str, int] = {}  # thread name -> tid, for threads other than the owner
        self._lane_names: dict[int, str] = {}  # tid -> lane name, for those lanes
        self._local = threading.local()  # .open: args of this thread's open ``traced`` spans

    def _open_stack(self) -> list[dict]:
        stack = getattr(self._local, "open", None)
        if stack is None:
            stack = self._local.open = []
        return stack

    def open_args(self) -> dict:
        """The args of the calling thread's innermost open ``traced`` span (e.g. the bucket being
        reduced), or {}."""
        stack = self._open_stack()
        return dict(stack[-1]) if stack else {}

    def start(self, comm, path: str) -> None:
        """Collective: check ``path`` is writable (rank 0), align clocks, become the active tracer.

        The calling thread becomes the owner (its events go on the ``TRACKS`` lanes). Raises
        UsageError on every rank when rank 0 cannot write ``path``.
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
        self._owner = threading.get_ident()
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
        """One complete event of ``track`` (host ``perf_counter`` times) on the calling thread's lane."""
        tid = TRACKS.index(track)
        event = {
            "name": name, "cat": track, "ph": "X", "pid": self.rank, "tid": tid,
            "ts": round((t0 - self.origin) * 1e6, 3), "dur": round(max(0.0, t1 - t0) * 1e6, 3),
            "args": {"step": step, **args},
        }
        if threading.get_ident() == self._owner:
            with self._lock:
                self.events.append(event)
            return
        thread = threading.current_thread().name
        with self._lock:
            lane = self._lanes.get(thread)
            event["tid"] = lane if lane is not None else self._new_lane(thread)
            self.events.append(event)

    def _new_lane(self, thread: str) -> int:
        """A lane for a thread other than the owner (under the lock): "comm thread" first."""
        if not self._lanes:
            tid, name = TRACKS.index(COMM_THREAD), COMM_THREAD
        else:
            tid, name = len(TRACKS) + len(self._lanes) - 1, f"thread {thread}"
        self._lanes[thread] = tid
        self._lane_names[tid] = name
        return tid

    def lanes(self) -> list[tuple[int, str]]:
        """(tid, name) of every lane this rank's events may use, in display order."""
        with self._lock:
            extra = sorted((tid, name) for tid, name in self._lane_names.items() if tid >= len(TRACKS))
        return [*enumerate(TRACKS), *extra]

    def finish(self, comm, path: str) -> str | None:
        """Collective: stop tracing, gather every rank's events to rank 0, which writes ``path``.

        Returns the path on rank 0, None elsewhere. Once per run, so the pickle-based gather is
        fine; its size is bounded by ``max_steps``.
        """
        global _active
        if _active is self:
            _active = None
        self.recording = False
        with self._lock:
            mine = list(self.events)
        per_rank = comm.gather((mine, self.lanes()), root=0)  # SYNC: blocks until every rank sent
        if comm.Get_rank() != 0:
            return None
        meta = []
        for r, (_, lanes) in enumerate(per_rank):
            meta.append({"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"rank {r}"}})
            meta.append({"name": "process_sort_index", "ph": "M", "pid": r, "args": {"sort_index": r}})
            for tid, lane in lanes:
                meta.append({"name": "thread_name", "ph": "M", "pid": r, "tid": tid, "args": {"name": lane}})
                meta.append({"name": "thread_sort_index", "ph": "M", "pid": r, "tid": tid, "args": {"sort_index": tid}})
        events = sorted((e for rank_events, _ in per_rank for e in rank_events), key=lambda e: (e["ts"], e["pid"]))
        document = {"traceEvents": meta + events, "displayTimeUnit": "ms",
                    "otherData": {"producer": "mpilm", "ranks": len(per_rank), "traced_steps": self.max_steps,
                                  "clock": "perf_counter offsets from a common Barrier exit, microseconds"}}
        target = Path(path).expanduser()
        target.write_text(json.dumps(document) + "\n")
        return str(target)
