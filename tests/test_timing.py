"""Phase timers, the Chrome trace and the end-of-run metrics: unit checks, one CPU training run
whose phases must add up to its step time, and (under mpirun) a traced run whose merged trace
holds every rank and whose summary.json holds the communication figures."""

import json
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest
import torch
from mpi4py import MPI

from mpilm import metrics, timing, trace
from mpilm.comm import world
from mpilm.errors import UsageError

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--eval-batches", "1", "--eval-every", "1000"]
SUMMARY_KEYS = ("tokens_per_s", "tokens_per_s_per_rank", "model_flops_per_s", "mfu", "bytes_sent_per_step",
                "bytes_received_per_step", "busbw_gbps", "comm_compute_ratio", "phases", "gradient_bytes")


def small_corpus(root: Path) -> str:
    """~220 KB of real text: plenty of windows, and a token cache built in a blink."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = root / "corpus.txt"
    path.write_bytes((stdlib / "argparse.py").read_bytes() + (stdlib / "typing.py").read_bytes())
    return str(path)


class FakeTraffic:
    def __init__(self):
        self.sent = self.received = 0


def test_summary_rows_add_up_to_the_step_and_credited_time_stays_apart():
    timer = timing.PhaseTimer("cpu", traffic=(traffic := FakeTraffic()))
    for step in range(4):
        timer.begin_step(step)
        with timer.phase("forward"):
            time.sleep(0.002)
        with timer.phase("comm"):
            time.sleep(0.001)
            timer.add("comm_total", 0.003)
        time.sleep(0.001)  # inside the step, outside every phase: "other"
        traffic.sent += 100
        traffic.received += 60
        timer.end_step()
    summary = timer.summary()
    phase_share = sum(summary[name]["share"] for name in (*timing.PHASES, "other"))
    assert phase_share == pytest.approx(1.0, abs=1e-9)
    assert summary["other"]["mean"] >= 0.0009 and summary["comm_total"]["mean"] == pytest.approx(0.003)
    assert list(summary)[-1] == "comm_total"  # credited rows come after "other"
    stats = timer.rank_stats()
    assert stats["bytes_sent"] == 100 and stats["bytes_received"] == 60
    assert stats["comm_total_s"] == pytest.approx(0.003)
    assert stats["compute_s"] == pytest.approx(summary["forward"]["mean"])
    table = timing.format_table(summary)
    assert "other" in table and "(overlaps the phases)" in table.splitlines()[-1]


def test_run_metrics_busbw_and_mfu():
    stats = {"step_s": 0.1, "compute_s": 0.06, "comm_s": 0.04, "comm_total_s": 0.05,
             "bytes_sent": 1.5e8, "bytes_received": 1.5e8}
    m = metrics.run_metrics(stats, world_size=4, tokens_per_step=4096, flops_per_token=1e6,
                            payload_bytes=100_000_000, device="cpu")
    assert m["tokens_per_s"] == pytest.approx(40960) and m["tokens_per_s_per_rank"] == pytest.approx(10240)
    assert m["model_flops_per_s"] == pytest.approx(40960e6)
    assert m["busbw_gbps"] == pytest.approx(1e8 * 2 * 3 / 4 / 0.05 / 1e9)  # nccl-tests convention
    assert m["wire_gbps"] == pytest.approx(1.5e8 / 0.05 / 1e9)
    assert m["comm_compute_ratio"] == pytest.approx(0.04 / 0.06)
    assert m["comm_hidden_share"] == pytest.approx(0.2)
    assert m["mfu"] is None and m["peak_flops_per_device"] is None  # CPU: no peak, no MFU
    single = metrics.run_metrics({**stats, "comm_total_s": 0.0}, world_size=1, tokens_per_step=1, flops_per_token=1,
                                 payload_bytes=10, device="cpu")
    assert single["busbw_gbps"] is None and single["comm_hidden_share"] is None


def test_hidden_share_is_clamped_when_skew_makes_the_exposed_wait_outlast_the_collectives():
    assert metrics.hidden_share(0.0, 0.05) == 1.0
    assert metrics.hidden_share(0.06, 0.05) == 0.0  # waited on a slower peer: hid nothing
    assert metrics.hidden_share(0.01, 0.0) is None


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA A10", 125e12),
    ("NVIDIA A10G", None), ("Tesla V100-SXM2-16GB", None), (None, None),
])
def test_peak_flops_table(name, peak):
    assert metrics.peak_flops(name) == peak


def test_trace_records_only_the_first_steps_in_chrome_format(tmp_path):
    path = tmp_path / "sub" / "trace.json"
    tracer = trace.Tracer(rank=0, max_steps=2)
    tracer.start(MPI.COMM_SELF, str(path))
    timer = timing.PhaseTimer("cpu", tracer=tracer)
    for step in range(3):
        timer.begin_step(step)
        with timer.phase("forward"):
            pass
        with timer.phase("comm"), trace.traced("communication", "allreduce b0", bucket=0, bytes=64, algorithm="ring"):
            pass
        timer.end_step()
    assert tracer.finish(MPI.COMM_SELF, str(path)) == str(path)
    assert trace.active_tracer() is None and trace.traced("communication", "x") is trace._NO_SPAN
    doc = json.loads(path.read_text())
    events = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert {e["args"]["step"] for e in events} == {0, 1}
    assert {e["name"] for e in events} == {"forward", "comm", "allreduce b0", "step 0", "step 1"}
    assert all(e["ts"] >= 0 and e["dur"] >= 0 and e["pid"] == 0 for e in events)
    bucket = next(e for e in events if e["name"] == "allreduce b0")
    assert bucket["args"] == {"step": 0, "bucket": 0, "bytes": 64, "algorithm": "ring"}
    assert bucket["tid"] == trace.TRACKS.index("communication")
    names = {(e["name"], e["args"].get("name")) for e in doc["traceEvents"] if e["ph"] == "M"}
    assert ("process_name", "rank 0") in names and ("thread_name", "communication") in names


def test_reducer_arithmetic_is_moved_from_comm_and_traced_with_its_bucket(tmp_path):
    from mpi4py import MPI as _MPI

    from mpilm.comm import compress
    from mpilm.comm.grad_sync import Bucket

    tracer = trace.Tracer(rank=0, max_steps=1)
    tracer.start(MPI.COMM_SELF, str(tmp_path / "trace.json"))
    timer = timing.PhaseTimer("cpu", tracer=tracer)
    timer.begin_step(0)
    bucket = Bucket(2, torch.float32, 0, 100, ["w"], torch.ones(100))
    with timer.phase("comm"):
        t = compress.make_compressor("fp16").bind(_MPI.COMM_SELF, "ring").reduce(bucket, 0)
        time.sleep(0.001)
    timer.move(t.compress_s, "comm", "compress")
    record = timer.end_step()
    assert record["compress"] == pytest.approx(t.compress_s) and record["comm"] >= 0.0009
    tracer.finish(MPI.COMM_SELF, str(tmp_path / "trace.json"))
    events = [e for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"] if e["ph"] == "X"]
    cast = [e for e in events if e["name"] == "fp16"]
    assert len(cast) == 2 and all(e["tid"] == trace.TRACKS.index("compression") for e in cast)
    assert cast[0]["args"]["bucket"] == 2 and cast[0]["args"]["algorithm"] == "ring"
    outer = next(e for e in events if e["name"] == "allreduce b2")
    assert all(outer["ts"] <= e["ts"] and e["ts"] + e["dur"] <= outer["ts"] + outer["dur"] + 1 for e in cast)
    # the comm phase's span is exactly split between what stays "comm" and what moved
    whole = next(e for e in events if e["name"] == "comm")["dur"] / 1e6
    assert record["comm"] + record["compress"] == pytest.approx(whole, abs=1e-5)


class FakeCudaEvent:
    """Stands in for torch.cuda.Event on machines without a GPU: 'device' time is host time."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, later):
        return (later.t - self.t) * 1e3  # milliseconds, like CUDA


def test_cuda_path_resolves_events_only_at_flush_and_maps_them_onto_the_host_clock(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeCudaEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    tracer = trace.Tracer(rank=0, max_steps=1)
    tracer.start(MPI.COMM_SELF, str(tmp_path / "trace.json"))
    timer = timing.PhaseTimer("cuda", tracer=tracer)
    assert timer.cuda
    timer.begin_step(0)
    with timer.phase("forward"):
        time.sleep(0.002)
    with timer.phase("comm"), trace.traced("communication", "allreduce b0", bucket=0, bytes=8, algorithm="ring"):
        time.sleep(0.003)
    timer.move(0.002, "comm", "compress")  # host-timed arithmetic re-labelled before the events resolve
    record = timer.end_step()
    assert "forward" not in record and len(timer._pending) == 2  # nothing resolved before a flush
    timer.flush()
    assert record["forward"] >= 0.002 and record["compress"] == 0.002
    assert 0.0009 <= record["comm"]
    tracer.finish(MPI.COMM_SELF, str(tmp_path / "trace.json"))
    events = {e["name"]: e for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"] if e["ph"] == "X"}
    step = events["step 0"]
    for name in ("forward", "comm", "allreduce b0"):
        assert step["ts"] - 1 <= events[name]["ts"] <= step["ts"] + step["dur"], name
    assert events["forward"]["dur"] == pytest.approx(record["forward"] * 1e6, abs=1)


def test_a_second_thread_traces_on_its_own_lane_while_the_main_thread_times_phases(tmp_path):
    """The comm thread's collectives (and its credited times) land beside backward, on a lane of
    their own, with their step and bucket args, and no event of either thread is lost."""
    path = tmp_path / "trace.json"
    tracer = trace.Tracer(rank=0, max_steps=3)
    tracer.start(MPI.COMM_SELF, str(path))
    timer = timing.PhaseTimer("cpu", tracer=tracer)
    n_buckets = 50
    for step in range(3):
        timer.begin_step(step)
        go = threading.Event()

        def comm_thread():
            go.wait()
            for b in range(n_buckets):
                with trace.traced("communication", f"allreduce b{b}", bucket=b, bytes=8, algorithm="ring"):
                    assert tracer.open_args()["bucket"] == b  # this thread's own span stack
                    timer.add("comm_total", 0.001)

        worker = threading.Thread(target=comm_thread, name="grad sync")
        worker.start()
        with timer.phase("backward"):
            go.set()
            for _ in range(n_buckets):
                with timer.phase("forward"):  # many main-thread events interleaved with the worker's
                    assert tracer.open_args() == {}  # the worker's open spans are not the main thread's
        worker.join()
        with timer.phase("comm"):
            pass
        record = timer.end_step()
        assert record["comm_total"] == pytest.approx(n_buckets * 0.001)
    tracer.finish(MPI.COMM_SELF, str(path))
    doc = json.loads(path.read_text())
    events = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    lane = trace.TRACKS.index(trace.COMM_THREAD)
    buckets = [e for e in events if e["cat"] == "communication"]
    assert len(buckets) == 3 * n_buckets
    assert all(e["tid"] == lane for e in buckets)
    assert sorted((e["args"]["step"], e["args"]["bucket"]) for e in buckets) == [
        (s, b) for s in range(3) for b in range(n_buckets)]
    main = [e for e in events if e["cat"] != "communication"]
    assert len([e for e in main if e["name"] == "forward"]) == 3 * n_buckets
    assert len([e for e in main if e["name"] == "backward"]) == 3
    assert all(e["tid"] != lane for e in main)
    assert {e["tid"] for e in main if e["name"] == "backward"} == {trace.TRACKS.index("compute")}
    lanes = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert lanes[lane] == "comm thread" and lanes[trace.TRACKS.index("communication")] == "communication"


def test_a_third_thread_gets_a_lane_of_its_own(tmp_path):
    path = tmp_path / "trace.json"
    tracer = trace.Tracer(rank=0, max_steps=1)
    tracer.start(MPI.COMM_SELF, str(path))
    tracer.begin_step(0)

    def record(name):
        with trace.traced("communication", name):
            pass

    for name in ("first", "second"):
        worker = threading.Thread(target=record, args=(name,), name=name)
        worker.start()
        worker.join()
    tracer.finish(MPI.COMM_SELF, str(path))
    doc = json.loads(path.read_text())
    tids = {e["name"]: e["tid"] for e in doc["traceEvents"] if e["ph"] == "X"}
    lanes = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert lanes[tids["first"]] == "comm thread" and lanes[tids["second"]] == "thread second"
    assert tids["second"] >= len(trace.TRACKS)


class _SlowName(str):
    """A phase name whose hashing runs Python code, so the interpreter may switch threads in the
    middle of ``record[name] += seconds``: an unlocked read-add-store then loses updates."""

    def __hash__(self):
        return str.__hash__(self)


def test_concurrent_add_from_two_threads_sums_exactly():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        timer = timing.PhaseTimer("cpu")
        timer.begin_step(0)
        n = 50_000
        total, bucket = _SlowName("comm_total"), _SlowName("comm_b0")

        def credit():
            for _ in range(n):
                timer.add(total, 1.0)
                timer.add(bucket, 0.5)

        workers = [threading.Thread(target=credit) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        record = timer.end_step()
    finally:
        sys.setswitchinterval(old)
    assert record["comm_total"] == 2 * n and record["comm_b0"] == n  # exact: ones and halves add exactly

def test_trace_path_that_cannot_be_written_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UsageError, match="--trace"):
        trace.Tracer(0).start(MPI.COMM_SELF, str(blocker / "trace.json"))


def test_cpu_run_phases_add_up_to_the_step_time(tmp_path):
    """One process, CPU: the six phases cover the step time to within 5%, and summary.json has
    every figure of the run report."""
    if world.size() != 1:
        pytest.skip("serial test")
    from mpilm import train
    out = tmp_path / "run"
    summary = train.run([*TINY, "--n-embd", "64", "--block-size", "64", "--steps", "12", "--log-every", "6",
                         "--data", small_corpus(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    phases = summary["phases"]
    covered = sum(phases[name]["mean"] for name in timing.PHASES)
    assert covered == pytest.approx(phases["step"]["mean"], rel=0.05), phases
    written = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in written, key
    assert written["mfu"] is None and written["bytes_sent_per_step"] == 0 and written["busbw_gbps"] is None
    assert written["tokens_per_s"] == pytest.approx(written["tokens_per_s_per_rank"])


@pytest.mark.mpi(min_size=2)
def test_traced_run_merges_every_rank_and_reports_traffic(tmp_path_factory):
    import mpilm.trace
    from mpilm import train
    comm = MPI.COMM_WORLD
    root = Path(comm.bcast(str(tmp_path_factory.mktemp("traced")) if comm.rank == 0 else None))
    corpus = comm.bcast(small_corpus(root) if comm.rank == 0 else None)
    trace = root / "trace.json"
    summary = train.run([*TINY, "--steps", "6", "--log-every", "3", "--allreduce", "ring", "--bucket-mb", "0.02",
                         "--trace", str(trace), "--trace-steps", "3", "--data", corpus,
                         "--cache-dir", str(root / "cache"), "--out", str(root / "run")])
    p = comm.size
    # the ring hands 2(p-1)/p of the gradient bytes to MPI, on average over ranks
    assert summary["bytes_sent_per_step"] == pytest.approx(2 * (p - 1) / p * summary["gradient_bytes"], rel=1e-3)
    assert summary["busbw_gbps"] > 0 and summary["comm_total_s_per_step"] > 0
    assert summary["tokens_per_s_per_rank"] * p == pytest.approx(summary["tokens_per_s"])
    if comm.rank != 0:
        return
    doc = json.loads(trace.read_text())
    events = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in events} == set(range(p))
    assert {e["args"]["step"] for e in events} == {0, 1, 2}
    for r in range(p):
        mine = [e for e in events if e["pid"] == r]
        assert {"data", "forward", "backward", "comm", "optimizer"} <= {e["name"] for e in mine}
        buckets = [e for e in mine if e["cat"] == "communication"]
        assert len(buckets) >= 3 * 2, "several buckets per traced step"
        assert all(set(e["args"]) == {"step", "bucket", "bytes", "algorithm", "compress"}
                   and e["args"]["algorithm"] == "ring" for e in buckets)
        # overlap is on: the bucket collectives ran on the communication thread's own lane
        lanes = mpilm.trace.TRACKS
        assert {e["tid"] for e in buckets} == {lanes.index(mpilm.trace.COMM_THREAD)}
    labels = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert labels == {f"rank {r}" for r in range(p)}
    written = json.loads((root / "run" / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in written, key
