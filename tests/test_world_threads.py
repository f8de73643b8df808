"""``world`` under threads: the traffic counters lose no update when several threads count at
once, and ``require_thread_level`` explains what to do when MPI granted too low a level."""

from __future__ import annotations

import os
import sys
import threading

import pytest
from mpi4py import MPI

from mpilm.comm import world
from mpilm.errors import UsageError


def test_require_thread_level_passes_when_granted(monkeypatch):
    monkeypatch.setattr(world.MPI, "Query_thread", lambda: MPI.THREAD_MULTIPLE)
    world.require_thread_level(MPI.THREAD_MULTIPLE, "a communication thread")
    world.require_thread_level(MPI.THREAD_SERIALIZED, "a communication thread")


@pytest.mark.parametrize("granted,name", [(MPI.THREAD_SINGLE, "single"), (MPI.THREAD_FUNNELED, "funneled"),
                                          (MPI.THREAD_SERIALIZED, "serialized")])
def test_require_thread_level_names_granted_needed_why_and_the_fix(monkeypatch, granted, name):
    monkeypatch.setattr(world.MPI, "Query_thread", lambda: granted)
    why = "--overlap (a communication thread calls the collectives while the main thread evaluates)"
    with pytest.raises(UsageError) as raised:
        world.require_thread_level(MPI.THREAD_MULTIPLE, why)
    message = str(raised.value)
    assert f"granted thread level '{name}'" in message
    assert "needs 'multiple'" in message
    assert why in message
    assert "MPI4PY_RC_THREAD_LEVEL=multiple" in message
    assert "thread support" in message
    assert getattr(raised.value, "collective", True)  # the same on every rank: exit 2, no abort


def test_thread_level_names():
    assert world.thread_level_name(MPI.THREAD_MULTIPLE) == "multiple"
    assert world.thread_level_name(MPI.THREAD_SINGLE) == "single"
    assert "unknown" in world.thread_level_name(99)


def test_traffic_counts_from_many_threads_lose_nothing():
    traffic = world.Traffic()
    threads, adds = 8, 20_000
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a race would show
    try:
        start = threading.Barrier(threads)

        def count():
            start.wait()
            for _ in range(adds):
                traffic.add(sent=1, received=2, shm_read=3, shm_written=4)

        workers = [threading.Thread(target=count) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(old)
    total = threads * adds
    assert traffic.snapshot() == {"sent": total, "received": 2 * total, "shm_read": 3 * total,
                                  "shm_written": 4 * total}
    assert (traffic.sent, traffic.received, traffic.shm_read, traffic.shm_written) == (total, 2 * total, 3 * total, 4 * total)
    traffic.reset()
    assert traffic.snapshot() == dict.fromkeys(world.Traffic.FIELDS, 0)


def test_comm_thread_priority_raised_when_permitted_else_main_lowered(monkeypatch):
    import threading

    calls = []
    monkeypatch.setattr(world, "_BASE_NICE", {})
    monkeypatch.setattr(os, "getpriority", lambda which, who: 0)
    monkeypatch.setattr(os, "setpriority", lambda which, who, value: calls.append((who, value)))
    me = threading.get_native_id()
    assert world.prioritize_this_thread(10) == "communication thread raised to nice -10"
    assert calls == [(me, -10)]
    assert world.prioritize_this_thread(0).endswith("(--comm-priority 0)") and len(calls) == 1

    def refuse_raising(which, who, value):
        if value < 0:
            raise PermissionError(13, "Permission denied")
        calls.append((who, value))

    calls.clear()
    monkeypatch.setattr(world, "_BASE_NICE", {})
    monkeypatch.setattr(os, "setpriority", refuse_raising)
    worker = {}
    thread = threading.Thread(target=lambda: worker.setdefault("said", world.prioritize_this_thread(5)))
    thread.start()
    thread.join()
    assert worker["said"].startswith("main (compute) thread lowered to nice 5")
    assert calls == [(threading.main_thread().native_id, 5)]
