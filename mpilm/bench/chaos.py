"""``python -m mpilm.bench chaos [--faults K] [--np N] [--cluster] [--kinds ...] [-- TRAIN OPTIONS]``.

Does: launches one uninterrupted *reference* run of ``mpilm.train`` (``--steps``, checkpoints
every ``--ckpt-every`` steps), then the same run again under K random faults, each attempt after
the first started with ``--resume auto``, until the run reaches ``--steps``; it then compares the
final parameters (``model.pt``) of both runs bit for bit (``torch.equal`` on every tensor). Fault
kinds (``--kinds``, drawn at random with ``--seed``):

- ``kill-rank``: SIGKILL to the process of a random rank (locally and on the cluster);
- ``kill-node``: ``python -m mpilm.cluster kill NODE`` (every process of a random node);
- ``link-down``: ``link NODE down`` (a pulled cable: the job can end only through the watchdog);
- ``stop-node``: ``stop NODE`` (SIGSTOP: a stalled node; again only the watchdog can end it).

Node faults hit a random node that runs part of the job (``--fault-nodes`` narrows the choice;
node0 also runs the launcher, ``mpiexec``, so stopping or cutting it off tests more than mpilm).

Each attempt runs until a checkpoint newer than the one it resumed from is complete (so every
attempt makes progress), then ``R`` more steps (R uniform in ``[0, 1.5 x --ckpt-every)``) and a
random fraction of one step; then the fault is injected. The bench watches the job's processes
(found by a marker in their environment: the launcher, Hydra's proxies, every rank on every
node) and restores what the fault broke (``link NODE up``, ``cont NODE``) once the job has ended.

Measured per fault (all in seconds of wall time, the table's columns):

- *at step*: the last step rank 0 logged before the job ended: every kind of fault stops some
  rank, so no step completes after it (read at the end, not when the fault is issued: a fault
  command takes ~0.1 s, ten steps of a tiny model).
- *ended after*: from the fault (its command returned) until the job has ended: its launcher
  has exited and no rank is left running, apart from processes the fault itself froze (a stopped
  node's, the launcher included when it runs there; they are continued afterwards and must then
  exit by themselves). A rank that outlives its launcher (e.g. on a node cut off by a dead link)
  keeps the job from ending. Target: within ``--comm-timeout`` + 10 s. A job not ended
  ``--comm-timeout`` + 30 s after the fault is *hung*. Either way the bench then restores the node
  or link; any process of the job (Hydra's proxies too) still there 10 s later is killed (by
  pid), and that fails the fault as well.
- *exit*: the launcher's exit status (``SIGKILL``: the launcher itself died with its node).
- *resumed from*: the step of the checkpoint the next attempt resumed from (its own banner).
- *time lost* = redo + detect + restart, where *redo* = (at step - resumed from) x the
  reference's wall time per step (progress since the last checkpoint, done again), *detect* =
  ended after (for a hung job: until its last process was gone), *restart* = from then until the
  next attempt logged its first step, less one reference step (restoring, cleaning up, launching,
  start-up, loading the checkpoint).

Prints the table and a verdict line (all K faults injected, every one ended in time and left no
process behind, the final run completed, its ``metrics.jsonl`` holds every step once, and the
parameters are bit-identical), exits 1 if the verdict fails; ``--json`` writes everything measured, ``--plot`` steps vs wall time of both runs
with the faults marked.

Does not: inject faults during start-up (data load, model broadcast) or after the last
checkpoint of the run; a fault is always injected into a job that has made progress. It does not
change the world size between attempts (resume is bit-exact only at the same one).

Limits: a driver that must run as one process on the host (not under ``mpirun -np >1`` and not
inside a cluster node). ``--cluster`` expects the emulated cluster named by ``MPILM_CLUSTER`` to
be up already (``python -m mpilm.cluster up --nodes 2``: the bench does not choose the link rate
or node count for you, and does not take down a cluster it did not make); it needs root like the
cluster itself. Every launch is in its own process group with ``--timeout`` as a last resort;
the bench finds the job's processes through ``/proc`` (Linux only). The checkpoint directory must
be visible from every node (it is: the emulated nodes share this machine's file system).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mpilm import checkpoint, cluster, config
from mpilm.bench import pyplot
from mpilm.bench.scaling import _child_env, _launcher
from mpilm.comm import world
from mpilm.errors import UsageError

DESCRIPTION = "K random faults (killed ranks and nodes, dead links, stalled nodes) with --resume auto vs an uninterrupted run"

KINDS = ("kill-rank", "kill-node", "link-down", "stop-node")
LOCAL_KINDS = ("kill-rank",)
# the cluster verbs that inject a node fault, and the ones that undo it
FAULT_VERBS = {"kill-node": ["kill"], "link-down": ["link", "down"], "stop-node": ["stop"]}
RESTORE_VERBS = {"link-down": ["link", "up"], "stop-node": ["cont"]}
END_SLACK_S = 10.0    # the target: a fault ends the job within --comm-timeout + this
HANG_MARGIN_S = 20.0  # watched this much longer before the job is called hung (to see how late it is)
POLL_S = 0.02
MARKER = "MPILM_CHAOS_JOB"  # in every process of a launched job's environment: how the bench finds them
# options the bench sets on every run itself
_OWNED = ("--steps", "--out", "--ckpt-every", "--ckpt-dir", "--resume", "--comm-timeout", "--log-every")
# tiny defaults so that ten faults take minutes; anything after -- overrides them
_CHILD_DEFAULTS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
                   "--eval-every", "1000000", "--eval-batches", "1"]
_STEP_LINE = re.compile(r"^step\s+(\d+)/\d+ \|")
_RESUMED = re.compile(r"^resumed from \S+ at step (\d+)$")
_FRESH = re.compile(r"^--resume auto: no complete checkpoint")
# run inside a node: exit 0 when every address given answers a TCP connect (a refusal is an answer)
_REACH_PROBE = """import socket, sys
for address in sys.argv[1:]:
    try:
        socket.create_connection((address, 9), timeout=1).close()
    except ConnectionRefusedError:
        pass
    except OSError:
        sys.exit(1)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--faults", type=int, default=10, help="faults to inject, one per attempt (default %(default)s)")
    parser.add_argument("--np", dest="np", type=int, default=None,
                        help="ranks (default 2; with --cluster every slot of the cluster)")
    parser.add_argument("--cluster", action="store_true",
                        help="launch through python -m mpilm.cluster run on the emulated cluster named by MPILM_CLUSTER, "
                             "which must be up already")
    parser.add_argument("--kinds", default=None,
                        help=f"comma-separated fault kinds from {','.join(KINDS)} (default: kill-rank; with --cluster all)")
    parser.add_argument("--fault-nodes", default=None,
                        help="with --cluster: comma-separated nodes that node faults may hit (default: every node the job "
                             "uses; node0 also runs the launcher)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedule: kinds, targets, times (default %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the run (default %(default)s)")
    parser.add_argument("--ckpt-every", type=int, default=10, help="checkpoint every N steps (default %(default)s)")
    parser.add_argument("--comm-timeout", type=float, default=10.0,
                        help="the runs' stall watchdog, seconds; a fault must end the job within it + 10 s (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds before any one launch is killed, as a last resort (default %(default)s)")
    parser.add_argument("--mpirun", default=None, help="local launcher (default: mpirun next to this python, else on PATH)")
    parser.add_argument("--out", default=None, help="keep the runs' outputs and logs under this directory "
                                                    "(default: a temporary one, removed)")
    parser.add_argument("--json", dest="json_path", default=None, help="write everything measured to this JSON file")
    parser.add_argument("--plot", default=None, help="write steps vs wall time of both runs, faults marked, to this PNG")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- TRAIN OPTIONS",
                        help="options for mpilm.train (model size, data, ...), after --")


# ---------------------------------------------------------------- checks
def parse_kinds(text: str | None, on_cluster: bool) -> list[str]:
    """The fault kinds to draw from; UsageError for unknown ones or node faults without --cluster."""
    if text is None:
        return list(KINDS if on_cluster else LOCAL_KINDS)
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if not kinds:
        raise UsageError(f"--kinds: empty list; name at least one of {','.join(KINDS)}")
    for kind in kinds:
        if kind not in KINDS:
            raise UsageError(f"--kinds {kind}: unknown; choose from {','.join(KINDS)}")
        if kind not in LOCAL_KINDS and not on_cluster:
            raise UsageError(f"--kinds {kind}: a node fault needs the emulated cluster (--cluster); locally only "
                             f"{','.join(LOCAL_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise UsageError(f"--kinds {text}: a kind is listed twice")
    return kinds


def steps_needed(faults: int, ckpt_every: int) -> int:
    """Steps that fit ``faults`` attempts for sure: each runs to a new checkpoint (at most one
    interval, plus a step or two while it completes) and up to 1.5 intervals more; the last
    attempt needs a checkpoint interval of its own."""
    return math.ceil(faults * 2.5 * ckpt_every) + 2 * ckpt_every


def _train_args(raw: list[str]) -> list[str]:
    args = raw[1:] if raw[:1] == ["--"] else list(raw)
    for arg in args:
        if arg.split("=")[0] in _OWNED:
            raise UsageError(f"{arg.split('=')[0]} after --: set by the chaos bench (use its own --steps/--ckpt-every/"
                             "--comm-timeout; outputs go under --out)")
    config.parse([*_CHILD_DEFAULTS, *args, "--out", "unused"], quiet=True)  # fail now, not in the first child
    return args


def parse_fault_nodes(text: str | None, nodes: cluster.Cluster | None) -> list[str] | None:
    """The node names node faults may hit (None: any the job uses); UsageError for unknown ones."""
    if text is None:
        return None
    if nodes is None:
        raise UsageError(f"--fault-nodes {text}: only with --cluster")
    try:
        names = [nodes.node(ref.strip()).name for ref in text.split(",") if ref.strip()]
    except cluster.ClusterError as err:
        raise UsageError(f"--fault-nodes: {err}") from None
    if not names:
        raise UsageError("--fault-nodes: empty list")
    return names


def _cluster_nodes() -> cluster.Cluster:
    try:
        cluster.need_root()
        return cluster.load(cluster.cluster_name())
    except cluster.ClusterError as err:
        raise UsageError(f"--cluster: {err}") from None


# ---------------------------------------------------------------- the job's processes
@dataclass(frozen=True)
class Proc:
    pid: int
    start: int          # start time in clock ticks since boot: tells this process from a later one with its pid
    rank: int | None    # PMI_RANK of an mpilm.train rank; None for the launcher, proxies and shells
    name: str           # the command's name (mpiexec, hydra_pmi_proxy, python, ...)


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state letter, start time, command name) of a live process, None if there is none with this pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": the command may hold spaces
    return fields[0], int(fields[19]), text[text.index("(") + 1:text.rindex(")")]


def job_processes(token: str) -> list[Proc]:
    """Every live process whose environment carries ``MARKER=token`` (on any emulated node too)."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0")
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if needle not in env:
            continue
        stat = _stat(int(entry.name))
        if stat is None:
            continue
        rank = next((int(e[9:]) for e in env if e.startswith(b"PMI_RANK=")), None)
        is_rank = rank is not None and b"mpilm.train" in argv
        found.append(Proc(int(entry.name), stat[1], rank if is_rank else None, stat[2]))
    return found


def state(proc: Proc) -> str | None:
    """The process's state letter (``T``: stopped), or None once it is gone (a zombie counts as gone)."""
    stat = _stat(proc.pid)
    if stat is None or stat[1] != proc.start or stat[0] in ("Z", "X"):
        return None
    return stat[0]


def describe(procs: list[Proc]) -> str:
    """``rank 1 (pid 123, S), hydra_pmi_proxy (pid 120, S)`` for the ones still alive."""
    alive = [(p, state(p)) for p in procs]
    return ", ".join(f"{f'rank {p.rank}' if p.rank is not None else p.name} (pid {p.pid}, {s})"
                     for p, s in alive if s is not None) or "none"


def kill_all(procs: list[Proc]) -> int:
    """SIGKILL to each of ``procs`` still alive (by pid, checked against its start time); how many."""
    killed = 0
    for proc in procs:
        if state(proc) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
                killed += 1
    return killed


# ---------------------------------------------------------------- one launch
class Attempt:
    """One launch of the training job, in its own process group, output to ``log``; progress read from it."""

    def __init__(self, cmd: list[str], log: Path, t0: float, timeline: list, resume: bool):
        self.token = uuid.uuid4().hex
        env = {**_child_env(), MARKER: self.token, "PYTHONUNBUFFERED": "1"}  # unbuffered: a killed rank's lines survive
        self.log = log
        self._fh = open(log, "w")
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._read, self._partial = 0, ""
        self.resumed: int | None = None if resume else 0  # the step it resumed from (0: a fresh start)
        self.last_step: int | None = None     # the last step rank 0 logged
        self.t_first_step: float | None = None
        self.t0, self.timeline = t0, timeline  # (seconds since t0, step), shared with other attempts

    def progress(self) -> None:
        """Read the new lines of the log: the resume banner and every logged step."""
        with open(self.log, errors="replace") as fh:
            fh.seek(self._read)
            chunk = fh.read()
            self._read = fh.tell()
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next read
        now = time.monotonic()
        for line in lines:
            if self.resumed is None and (m := _RESUMED.match(line)):
                self.resumed = int(m.group(1))
            elif self.resumed is None and _FRESH.match(line):
                self.resumed = 0
            elif m := _STEP_LINE.match(line):
                self.last_step = int(m.group(1))
                if self.t_first_step is None:
                    self.t_first_step = now
                self.timeline.append((now - self.t0, self.last_step))

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """The last resort: SIGKILL to the process group and to every process carrying the marker."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        kill_all(job_processes(self.token))
        self.proc.wait()

    def close(self) -> None:
        self.proc.wait()
        self.progress()
        self._fh.close()

    def first_error(self) -> str | None:
        """The first line of the log that says ``error:`` (e.g. the watchdog's), for the report."""
        for line in self.log.read_text(errors="replace").splitlines():
            if "error:" in line:
                return line.strip()
        return None


def _exit_text(status: int | None) -> str:
    if status is None:
        return "-"
    return signal.Signals(-status).name if status < 0 else str(status)


# ---------------------------------------------------------------- the bench
@dataclass
class Fault:
    """One injected fault and what it cost (the module docstring defines every figure)."""

    index: int
    kind: str
    target: str                           # "rank 1 (node1)" or a node name
    at_step: int | None = None
    t_fault: float = 0.0                  # seconds since the chaos run began
    ended_after_s: float | None = None    # None: hung
    over_after_s: float = 0.0             # until the job's last process was gone (after the restore, or killed)
    launcher_after_s: float | None = None  # until the launcher exited (later than ended when it was frozen)
    exit_status: int | None = None        # the launcher's (negative: the signal that killed it)
    hung: bool = False
    killed_by_bench: int = 0              # processes of the job the bench had to kill after the restore
    link_back_s: float | None = None      # link-down: from link up until the node reached its peers again
    resumed_from: int | None = None
    redo_s: float | None = None
    detect_s: float | None = None
    restart_s: float | None = None
    lost_s: float | None = None
    ok: bool = False
    message: str | None = None           # the job's first error line (the watchdog's, for instance)
    notes: list[str] = field(default_factory=list)


class Chaos:
    """The reference run, the faulted attempts, and the fault schedule (one RNG seeded by --seed)."""

    def __init__(self, args, train_args: list[str], kinds: list[str], nodes: cluster.Cluster | None,
                 fault_nodes: list[str] | None, root: Path):
        self.args, self.kinds, self.nodes, self.fault_nodes, self.root = args, kinds, nodes, fault_nodes, root
        self.np = args.np or (None if nodes else 2)
        self.rng = random.Random(args.seed)
        self.limit_s = args.comm_timeout + END_SLACK_S
        self.child = [*_CHILD_DEFAULTS, *train_args, "--steps", str(args.steps), "--ckpt-every", str(args.ckpt_every),
                      "--comm-timeout", f"{args.comm_timeout:g}", "--log-every", "1"]
        self.launcher = None if nodes else _launcher(args.mpirun)
        self.broken: tuple[str, str] | None = None  # (kind, node) of a fault not yet restored

    def command(self, out: Path, resume: bool) -> list[str]:
        train = [sys.executable, "-m", "mpilm.train", *self.child, "--out", str(out), *(["--resume", "auto"] if resume else [])]
        if self.nodes is None:
            return [self.launcher, "-np", str(self.np), *train]
        return [sys.executable, "-m", "mpilm.cluster", "run", *(["-np", str(self.np)] if self.np else []), "--", *train]

    def wait_to_end(self, attempt: Attempt, what: str) -> None:
        """Until the attempt's launcher exits (bounded by --timeout); RuntimeError unless it succeeded."""
        deadline = attempt.t_start + self.args.timeout
        while attempt.running():  # blocks on the job, bounded by --timeout
            attempt.progress()
            if time.monotonic() > deadline:
                attempt.kill()
                raise RuntimeError(f"chaos: {what} took longer than --timeout {self.args.timeout:g}s and was killed; "
                                   f"its output is in {attempt.log}")
            time.sleep(POLL_S)
        attempt.close()
        if attempt.proc.returncode != 0:
            tail = "\n".join(attempt.log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"chaos: {what} failed (exit {_exit_text(attempt.proc.returncode)}):\n{tail}")

    def cluster_cli(self, *words: str) -> None:
        """``python -m mpilm.cluster WORDS`` in this process (the same code and checks as the command line)."""
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            status = cluster.main(list(words))
        if status != 0:
            raise RuntimeError(f"chaos: python -m mpilm.cluster {' '.join(words)}: {captured.getvalue().strip()}")

    def restore(self) -> float | None:
        """Undo the pending fault; for a link, also wait until it carries traffic again (seconds, or
        None if it did not within END_SLACK_S): right after ``link up`` a node's neighbour entries
        are still marked failed and a connect gets "No route to host" (seen: Hydra's proxy could not
        reach mpiexec, and the next launch failed)."""
        if self.broken is None:
            return None
        kind, node = self.broken
        self.broken = None
        verb = RESTORE_VERBS[kind]
        t0 = time.monotonic()
        self.cluster_cli(verb[0], node, *verb[1:])
        if kind != "link-down":
            return None
        peers = [n.ip for n in self.nodes.nodes if n.name != node]
        while time.monotonic() - t0 < END_SLACK_S:  # blocks on the link, bounded
            probe = subprocess.run([sys.executable, "-m", "mpilm.cluster", "exec", node, "--", sys.executable, "-c",
                                    _REACH_PROBE, *peers], capture_output=True, env=_child_env())
            if probe.returncode == 0:
                return time.monotonic() - t0
            time.sleep(0.2)
        return None

    # ---- one fault
    def inject(self, attempt: Attempt, fault: Fault, t0: float) -> list[Proc]:
        """Pick the target now (the ranks' processes exist), inject, return the job's processes."""
        procs = job_processes(attempt.token)
        if fault.kind == "kill-rank":
            ranks = sorted((p for p in procs if p.rank is not None), key=lambda p: p.rank)
            if not ranks:
                raise RuntimeError(f"chaos: no rank process of the job found (marker {MARKER}); see {attempt.log}")
            victim = self.rng.choice(ranks)
            where = ""
            if self.nodes is not None:
                where = next((f" ({n.name})" for n in self.nodes.nodes if victim.pid in cluster.namespace_pids(n.netns)), "")
            fault.target = f"rank {victim.rank}{where}"
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim.pid, signal.SIGKILL)
        else:
            pids = {p.pid for p in procs}
            used = [n.name for n in self.nodes.nodes if pids & set(cluster.namespace_pids(n.netns))
                    and (self.fault_nodes is None or n.name in self.fault_nodes)]
            if not used:
                raise RuntimeError(f"chaos: no node of --fault-nodes {','.join(self.fault_nodes)} runs a process of the job")
            node = self.rng.choice(used)
            fault.target = node
            verb = FAULT_VERBS[fault.kind]
            if fault.kind in RESTORE_VERBS:
                self.broken = (fault.kind, node)
            self.cluster_cli(verb[0], node, *verb[1:])
        fault.t_fault = time.monotonic() - t0
        return procs

    def watch_end(self, attempt: Attempt, fault: Fault, procs: list[Proc], t_fault: float) -> float:
        """Until the job has ended (or is called hung), restore, clean up; returns when it was over."""
        hung_at = t_fault + self.limit_s + HANG_MARGIN_S
        launcher = next((p for p in procs if p.pid == attempt.proc.pid), Proc(attempt.proc.pid, -1, None, "launcher"))
        ranks = [p for p in procs if p.rank is not None]
        while True:  # blocks on the job's processes, bounded by hung_at
            now = time.monotonic()
            if attempt.proc.poll() is not None and fault.launcher_after_s is None:
                fault.launcher_after_s = now - t_fault
            # a process the fault stopped cannot end before it is continued: it does not count
            launcher_over = attempt.proc.poll() is not None or state(launcher) in ("T", "t")
            if launcher_over and not [p for p in ranks if state(p) not in (None, "T", "t")]:
                fault.ended_after_s = now - t_fault
                break
            if now > hung_at:
                fault.hung = True
                fault.notes.append(f"alive when called hung: {describe(procs)}")
                break
            attempt.progress()
            time.sleep(POLL_S)
        t_restore = time.monotonic()
        link_back = self.restore()
        if fault.kind == "link-down":
            fault.link_back_s = link_back
            if link_back is None:
                fault.notes.append(f"the link carried no traffic {END_SLACK_S:g} s after link up")
        gone_by = max(time.monotonic(), t_restore + END_SLACK_S)
        while [p for p in procs if state(p) is not None] and time.monotonic() < gone_by:
            time.sleep(POLL_S)
        fault.killed_by_bench = kill_all([*procs, *job_processes(attempt.token)])
        over = time.monotonic()
        attempt.close()
        fault.at_step = attempt.last_step
        if fault.launcher_after_s is None:
            fault.launcher_after_s = time.monotonic() - t_fault
        fault.exit_status = attempt.proc.returncode
        fault.over_after_s = over - t_fault
        fault.message = attempt.first_error()
        if fault.hung:
            fault.notes.append(f"still running {self.limit_s + HANG_MARGIN_S:g} s after the fault"
                               + (f"; {fault.killed_by_bench} process(es) killed by the bench after the restore"
                                  if fault.killed_by_bench else "; gone after the restore"))
        elif fault.killed_by_bench:
            fault.notes.append(f"{fault.killed_by_bench} process(es) still there {END_SLACK_S:g} s after the restore, "
                               "killed by the bench")
        if fault.launcher_after_s > (fault.ended_after_s or 0) + 1 and not fault.hung:
            fault.notes.append(f"the launcher exited only {fault.launcher_after_s:.1f} s after the fault")
        return fault.ended_after_s + t_fault if fault.ended_after_s is not None else over

    def wait_for_progress(self, attempt: Attempt, ckpt_dir: Path, newer_than: int) -> bool:
        """Until a checkpoint newer than ``newer_than`` is complete, then R more steps and a random
        fraction of a step. False if the job ended first."""
        deadline = attempt.t_start + self.args.timeout
        while True:  # blocks on the job's first new checkpoint, bounded by --timeout
            attempt.progress()
            if not attempt.running():
                return False
            done = checkpoint.complete_checkpoints(ckpt_dir)
            if done and int(done[-1].name[5:]) > newer_than:
                break
            if time.monotonic() > deadline:
                attempt.kill()
                raise RuntimeError(f"chaos: no new checkpoint within --timeout {self.args.timeout:g}s; see {attempt.log}")
            time.sleep(POLL_S)
        target = int(done[-1].name[5:]) + self.rng.randrange(max(1, int(1.5 * self.args.ckpt_every)))
        while attempt.last_step is None or attempt.last_step < target:
            attempt.progress()
            if not attempt.running():
                return False
            if time.monotonic() > deadline:
                attempt.kill()
                raise RuntimeError(f"chaos: step {target} not reached within --timeout {self.args.timeout:g}s; see {attempt.log}")
            time.sleep(POLL_S)
        time.sleep(self.rng.uniform(0, self.ref_step_s))
        return attempt.running()

    def reference(self) -> dict:
        out = self.root / "reference"
        timeline: list = []
        t0 = time.monotonic()
        attempt = Attempt(self.command(out, resume=False), self.root / "reference.log", t0, timeline, resume=False)
        self.wait_to_end(attempt, "the reference run")
        wall = time.monotonic() - t0
        summary = json.loads((out / "summary.json").read_text())
        self.ref_step_s = summary["wall_s"] / self.args.steps
        return {"wall_s": wall, "train_wall_s": summary["wall_s"], "step_s": self.ref_step_s, "timeline": timeline,
                "out": str(out)}

    def chaos(self) -> tuple[list[Fault], dict]:
        out, t0 = self.root / "chaos", time.monotonic()
        ckpt_dir = out / "ckpt"
        timeline: list = []
        faults: list[Fault] = []
        attempts = []
        previous: tuple[Fault, float] | None = None  # the last fault, and when its job was over
        while True:
            newest = checkpoint.complete_checkpoints(ckpt_dir)
            newer_than = int(newest[-1].name[5:]) if newest else 0
            n = len(attempts)
            attempt = Attempt(self.command(out, resume=n > 0), self.root / f"chaos-attempt-{n}.log", t0, timeline,
                              resume=n > 0)
            attempts.append({"log": str(attempt.log), "t_start": attempt.t_start - t0})
            fault = None
            try:
                if len(faults) < self.args.faults:
                    fault = Fault(len(faults) + 1, self.rng.choice(self.kinds), "")
                    if self.wait_for_progress(attempt, ckpt_dir, newer_than):
                        procs = self.inject(attempt, fault, t0)
                        t_over = self.watch_end(attempt, fault, procs, t0 + fault.t_fault)
                        ended = "hung" if fault.hung else f"ended after {fault.ended_after_s:.1f} s"
                        print(f"# fault {fault.index}/{self.args.faults}: {fault.kind} {fault.target} at step "
                              f"{fault.at_step}: {ended} (exit {_exit_text(fault.exit_status)})", flush=True)
                    else:
                        attempt.close()
                        if attempt.proc.returncode != 0:
                            raise RuntimeError(f"chaos: attempt {n} ended by itself (exit "
                                               f"{_exit_text(attempt.proc.returncode)}) before its fault; see {attempt.log}")
                        fault = None  # it reached --steps first: the verdict counts the faults missing
                else:
                    self.wait_to_end(attempt, f"the last attempt ({n})")
            except BaseException:
                if attempt.running():
                    attempt.kill()
                raise
            if previous is not None:
                self._account(*previous, attempt)
            if fault is None:
                break
            faults.append(fault)
            previous = (fault, t_over)
        wall = time.monotonic() - t0
        return faults, {"wall_s": wall, "timeline": timeline, "attempts": attempts, "out": str(out),
                        "metrics_steps": _metrics_steps(out / "metrics.jsonl")}

    def _account(self, fault: Fault, t_over: float, nxt: Attempt) -> None:
        """Fill in what a fault cost, from the next attempt (where it resumed, when it stepped again)."""
        fault.resumed_from = nxt.resumed
        fault.detect_s = t_over - (nxt.t0 + fault.t_fault)
        if fault.at_step is not None and nxt.resumed is not None:
            fault.redo_s = max(0, fault.at_step - nxt.resumed) * self.ref_step_s
        if nxt.t_first_step is not None:
            fault.restart_s = nxt.t_first_step - t_over - self.ref_step_s
        if None not in (fault.redo_s, fault.restart_s):
            fault.lost_s = fault.redo_s + fault.detect_s + fault.restart_s
        fault.ok = (not fault.hung and fault.ended_after_s is not None and fault.ended_after_s <= self.limit_s
                    and fault.killed_by_bench == 0 and fault.resumed_from is not None)


def _metrics_steps(path: Path) -> list[int]:
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def compare(reference: Path, other: Path) -> dict:
    """Bit-for-bit comparison of two ``model.pt`` files: every tensor ``torch.equal``."""
    a, b = checkpoint.load(reference)["model"], checkpoint.load(other)["model"]
    differing = sorted(name for name in a.keys() & b.keys() if not torch.equal(a[name], b[name]))
    missing = sorted(a.keys() ^ b.keys())
    return {"tensors": len(a), "differing": differing, "missing": missing,
            "bit_identical": not differing and not missing}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_rows(faults: list[Fault], limit_s: float) -> str:
    lines = [f"{'#':>3} {'kind':<10} {'target':<14} {'at step':>7} {'ended after s':>13} {'exit':>7} "
             f"{'resumed from':>12} {'redo s':>7} {'detect s':>8} {'restart s':>9} {'time lost s':>11}  ok"]
    for f in faults:
        ended = f"hung>{limit_s + HANG_MARGIN_S:g}" if f.hung else _fmt(f.ended_after_s, ".1f")
        lines.append(f"{f.index:>3} {f.kind:<10} {f.target:<14} {_fmt(f.at_step, 'd'):>7} {ended:>13} "
                     f"{_exit_text(f.exit_status):>7} {_fmt(f.resumed_from, 'd'):>12} {_fmt(f.redo_s, '.2f'):>7} "
                     f"{_fmt(f.detect_s, '.1f'):>8} {_fmt(f.restart_s, '.1f'):>9} {_fmt(f.lost_s, '.1f'):>11}  "
                     f"{'yes' if f.ok else 'NO'}")
    return "\n".join(lines)


def plot(path: str, reference: dict, chaos: dict, faults: list[Fault], title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for timeline, style, label in ((reference["timeline"], dict(color="0.5", lw=2, alpha=0.6), "reference (no faults)"),
                                   (chaos["timeline"], dict(color="tab:blue", lw=1.2), "under faults, --resume auto")):
        if timeline:
            t, s = zip(*timeline)
            ax.plot(t, s, ".", ms=2, **{k: v for k, v in style.items() if k != "lw"}, label=label)
    colors = {"kill-rank": "tab:red", "kill-node": "tab:purple", "link-down": "tab:orange", "stop-node": "tab:green"}
    shown = set()
    for f in faults:
        ax.axvline(f.t_fault, color=colors[f.kind], ls="--", lw=1, label=None if f.kind in shown else f.kind)
        shown.add(f.kind)
        if f.detect_s is not None and f.restart_s is not None:  # from the fault to the next attempt's first step
            ax.axvspan(f.t_fault, f.t_fault + f.detect_s + f.restart_s, color=colors[f.kind], alpha=0.12, lw=0)
        if f.at_step is not None:
            ax.annotate(str(f.index), (f.t_fault, f.at_step), textcoords="offset points", xytext=(3, 3), fontsize=8)
    ax.set_xlabel("wall time since the run's first launch (s)")
    ax.set_ylabel("step")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> dict:
    if world.size() > 1:
        raise UsageError("chaos launches its own jobs: run it as one process (python -m mpilm.bench chaos ...), "
                         "not under mpirun -np N")
    kinds = parse_kinds(args.kinds, args.cluster)
    if args.faults < 1:
        raise UsageError(f"--faults {args.faults}: must be >= 1")
    if args.ckpt_every < 1:
        raise UsageError(f"--ckpt-every {args.ckpt_every}: must be >= 1 (the faults need checkpoints to resume from)")
    if args.steps < steps_needed(args.faults, args.ckpt_every):
        raise UsageError(f"--steps {args.steps}: {args.faults} faults at --ckpt-every {args.ckpt_every} need at least "
                         f"{steps_needed(args.faults, args.ckpt_every)} steps (each attempt runs to a new checkpoint "
                         "and up to 1.5 intervals more)")
    if args.np is not None and args.np < 2:
        raise UsageError(f"--np {args.np}: a fault needs peers to notice it; use 2 or more ranks")
    if not args.comm_timeout > 0 or not args.timeout > 0:
        raise UsageError("--comm-timeout and --timeout must be > 0")
    train_args = _train_args(args.train_args)
    for option, path in (("--json", args.json_path), ("--plot", args.plot)):
        if path and not Path(path).expanduser().resolve().parent.is_dir():
            raise UsageError(f"{option} {path}: its directory does not exist")
    if args.fault_nodes is not None and not args.cluster:
        raise UsageError(f"--fault-nodes {args.fault_nodes}: only with --cluster")
    nodes = _cluster_nodes() if args.cluster else None
    fault_nodes = parse_fault_nodes(args.fault_nodes, nodes)
    if nodes is not None and args.np is not None:
        try:
            cluster.launch_plan(nodes, args.np, None)
        except cluster.ClusterError as err:
            raise UsageError(f"--np: {err}") from None

    keep = args.out is not None
    root = Path(args.out).expanduser().resolve() if keep else Path(tempfile.mkdtemp(prefix="mpilm-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    for name in ("reference", "chaos"):
        shutil.rmtree(root / name, ignore_errors=True)  # a fresh run: --resume auto must not find old checkpoints
    bench = Chaos(args, train_args, kinds, nodes, fault_nodes, root)
    where = (f"emulated cluster {nodes.name} ({len(nodes.nodes)} nodes, {nodes.rate} links)" if nodes
             else f"this machine, {bench.launcher}")
    print(f"# mpilm chaos: {args.faults} faults from {','.join(kinds)} (seed {args.seed}), {bench.np or 'all'} ranks on "
          f"{where}, {args.steps} steps, checkpoints every {args.ckpt_every}, --comm-timeout {args.comm_timeout:g} s "
          f"(target: every fault ends the job within {bench.limit_s:g} s)", flush=True)
    print(f"# train options: {' '.join(bench.child)}", flush=True)
    completed = False
    try:
        reference = bench.reference()
        print(f"# reference: {reference['wall_s']:.1f} s ({reference['step_s'] * 1e3:.1f} ms per step in training)", flush=True)
        faults, chaos = bench.chaos()
        final = compare(Path(reference["out"]) / "model.pt", Path(chaos["out"]) / "model.pt")
        completed = True
    finally:
        bench.restore()  # never leave a link down or a node stopped behind
        if not keep and completed:
            shutil.rmtree(root, ignore_errors=True)
        elif not completed:
            print(f"# the runs' outputs and logs are kept in {root}", file=sys.stderr, flush=True)

    print(format_rows(faults, bench.limit_s))
    for f in faults:
        for note in ([f"error line: {f.message}"] if f.message and not f.ok else []) + f.notes:
            print(f"#   fault {f.index}: {note}")
    lost = [f.lost_s for f in faults if f.lost_s is not None]
    continuous = chaos["metrics_steps"] == list(range(1, args.steps + 1))
    passed = (len(faults) == args.faults and all(f.ok for f in faults) and final["bit_identical"] and continuous)
    print(f"# wall time: reference {reference['wall_s']:.1f} s, under faults {chaos['wall_s']:.1f} s "
          f"({chaos['wall_s'] - reference['wall_s']:+.1f} s; time lost summed over faults {sum(lost):.1f} s, "
          f"{sum(lost) / len(lost) if lost else 0:.1f} s per fault); metrics.jsonl "
          f"{'continuous' if continuous else 'NOT continuous'} over steps 1-{args.steps}")
    ended = sum(1 for f in faults if f.ok)
    print(f"verdict: {len(faults)}/{args.faults} faults injected, {ended} ended the job within {bench.limit_s:g} s and "
          f"left nothing behind; final parameters {'bit-identical' if final['bit_identical'] else 'DIFFERENT'} "
          f"to the reference ({final['tensors'] - len(final['differing'])}/{final['tensors']} tensors equal): "
          f"{'PASS' if passed else 'FAIL'}")
    result = {"faults_requested": args.faults, "kinds": kinds, "seed": args.seed, "np": bench.np,
              "cluster": {"name": nodes.name, "nodes": len(nodes.nodes), "link": nodes.rate} if nodes else None,
              "fault_nodes": fault_nodes, "steps": args.steps, "ckpt_every": args.ckpt_every, "comm_timeout_s": args.comm_timeout,
              "limit_s": bench.limit_s, "train_args": bench.child, "reference": reference, "chaos": chaos,
              "faults": [asdict(f) for f in faults], "final": final, "metrics_continuous": continuous,
              "passed": passed}
    if args.json_path:
        Path(args.json_path).expanduser().write_text(json.dumps(result, indent=1) + "\n")
        print(f"# wrote {args.json_path}")
    if args.plot:
        plot(args.plot, reference, chaos, faults,
             f"chaos: {len(faults)} faults, {bench.np or 'all'} ranks" + (f" on {len(nodes.nodes)} emulated nodes" if nodes else ""))
        print(f"# wrote {args.plot}")
    if not passed:
        raise SystemExit(1)
    return result
