"""Checkpoints that survive crashes: atomic save, verified load.

``save(path, state)`` writes to a temporary file in the same directory, fsyncs it and renames it
over the target, so a reader sees either the previous complete file or the new complete file,
never a torn one. Every file carries ``format`` and ``version`` keys; ``load`` refuses files that
are not mpilm checkpoints of a known version, with a message that says what to do.

``save``/``load``: one file (``model.pt`` at the end of a run; only rank 0 writes it, the
parameters being identical on every rank). ``Writer``/``complete_checkpoints``/``verify``/
``load_rank``: training checkpoints, one directory per step holding every rank's state.

A directory that cannot be written, or a disk that fills up, is a ``UsageError`` on every rank:
``writable_problem`` tries a directory before a run starts; ``agreed_writes`` and ``Writer`` turn a
failed write on one rank (usually rank 0, the only one writing most files) into the same verdict
everywhere, and a failed checkpoint leaves nothing behind but the earlier complete ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
from mpi4py import MPI

from mpilm.errors import UsageError


FORMAT = "mpilm-checkpoint"
VERSION = 1


def save(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically; on failure (a full disk) the temporary file is removed
    and the previous ``path``, if any, is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    payload = {"format": FORMAT, "version": VERSION, **state}
    try:
        with open(tmp, "wb") as fh:
            _torch_save(payload, fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _torch_save(payload: dict, fh) -> None:
    """torch.save into an open file, flushed and fsynced. A failed write is raised as the OSError it
    is: torch reports it as an opaque ``RuntimeError: [enforce fail at inline_container.cc...]``
    whose ``__context__`` holds the OSError (seen with ENOSPC on torch 2.13)."""
    try:
        torch.save(payload, fh)
    except RuntimeError as err:
        cause = err.__context__
        if not isinstance(cause, OSError):
            raise
        raise OSError(cause.errno, cause.strerror) from err
    fh.flush()
    os.fsync(fh.fileno())


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not an mpilm checkpoint")
    if state.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')}, this mpilm reads version {VERSION}")
    return state


# ---------------------------------------------------------------- writable directories, agreed failures
def writable_problem(path: str | os.PathLike, option: str) -> str | None:
    """None if this process can create ``path`` (with its parents) and write a file in it; else the
    reason, as ``"<option> <path>: cannot create or write (<reason>)"``.

    Does: really creates the directory, then creates, writes, fsyncs and removes a probe file
    (permission bits do not stop root; a read-only mount, a path under a regular file, or an
    immutable directory do, and this finds them all).
    Does not: reserve space; a disk that fills later is reported when the write fails
    (``agreed_writes``, ``Writer``). Limits: tests this process's view only (call it on every
    rank that writes there).
    """
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mpilm-probe-", dir=path)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        return f"{option} {path}: cannot create or write ({err.strerror or err})"
    return None


def _describe(err: BaseException) -> str:
    """``"OSError: [Errno 28] No space left on device"``."""
    return f"{type(err).__name__}: {err}"


def first_problem(comm, mine: str | None) -> str | None:
    """SYNC (an allgather): the lowest rank's problem, None if no rank has one; the same on every rank."""
    return next((p for p in comm.allgather(mine) if p), None)


@contextlib.contextmanager
def agreed_writes(comm, what: str | os.PathLike, collective: bool = True):
    """Every rank enters; an ``OSError`` from the writes inside (on whichever ranks do them, usually
    rank 0 alone) becomes the same ``UsageError`` on every rank: ``rank r could not write WHAT (...)``.

    SYNC: one allgather on leaving the block, on every rank, whether or not it wrote anything.
    ``collective=False``: only this rank enters (the async parameter server's log lines); its
    error aborts the job with status 2 instead. Does not: catch other exceptions (those are bugs:
    traceback and abort, as everywhere).
    """
    mine = None
    try:
        yield
    except OSError as err:
        mine = f"rank {comm.Get_rank()} could not write {what} ({_describe(err)})"
        if not collective:
            raise UsageError(mine, collective=False) from None
    if not collective:
        return
    problem = first_problem(comm, mine)  # SYNC: did any rank's write fail?
    if problem:
        raise UsageError(problem)


# ---------------------------------------------------------------- training checkpoints (directories)
DONE = "DONE"
MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


class Writer:
    """Training checkpoints as directories ``<dir>/step-<N>/``, written without stalling training.

    Does: at a step boundary ``begin(step, state, meta)`` takes this rank's state (already host
    copies: ``Run.state_dict`` clones every tensor) and a background thread writes it to
    ``.step-<N>.tmp/rank-<r>.pt`` with an fsync; ``poll()`` after each later step asks every rank
    (SYNC: one small allreduce, only while a write is pending) whether all have finished, and
    then rank 0 writes ``meta.json`` and a manifest with every file's sha256, renames the
    directory to ``step-<N>``, writes ``DONE`` last and removes all but the newest ``keep``
    complete checkpoints. A crash at any point leaves either no ``step-<N>`` or a complete one.
    A failed write (a full disk) on any rank, in the background or in rank 0's meta/manifest/DONE,
    is one ``UsageError`` on every rank; the partial ``.step-<N>.tmp`` is removed first, and the
    earlier checkpoints are left as they were (old ones are pruned only after a new one is complete).

    Does not: decide when to checkpoint (``train.py``), read checkpoints (``find``/``load_rank``).

    Limits: every rank must see the same directory (a shared file system across nodes); one
    checkpoint in flight at a time (``begin`` first finishes the previous one, blocking).
    """

    def __init__(self, directory: str | os.PathLike, comm, keep: int):
        self.directory, self.comm, self.keep = Path(directory), comm, keep
        self.rank = comm.Get_rank()
        self._thread: threading.Thread | None = None
        self._pending: tuple[int, dict] | None = None  # (step, meta) of the checkpoint being written
        self._error: BaseException | None = None
        self.stalls: list[float] = []  # seconds the training loop spent in begin() per checkpoint
        self.written: list[Path] = []

    def begin(self, step: int, state: dict, meta: dict) -> None:
        t0 = time.perf_counter()
        self.finish()  # SYNC: the previous checkpoint completes first
        tmp = self.directory / f".step-{step}.tmp"
        problem = None
        if self.rank == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
                tmp.mkdir(parents=True)
            except OSError as err:
                problem = self._failed(step, f"rank 0 could not create {tmp.name} ({_describe(err)})")
        problem = self.comm.bcast(problem, root=0)  # SYNC: the directory exists before any rank writes into it
        if problem:
            raise UsageError(problem)
        self._pending, self._error = (step, meta), None
        self._thread = threading.Thread(target=self._write, args=(tmp / rank_file(self.rank), state),
                                        name="mpilm-ckpt", daemon=True)
        self._thread.start()
        self.stalls.append(time.perf_counter() - t0)

    def _write(self, path: Path, state: dict) -> None:
        try:
            with open(path, "wb") as fh:
                _torch_save({"format": FORMAT, "version": VERSION, **state}, fh)
        except BaseException as err:  # reported collectively by poll()/finish()
            self._error = err

    def poll(self) -> Path | None:
        """Complete the pending checkpoint if every rank has written its file (SYNC while pending)."""
        if self._pending is None:
            return None
        mine_done = self._thread is None or not self._thread.is_alive()
        if not self.comm.allreduce(mine_done, op=MPI.LAND):  # SYNC: all ranks' writers done?
            return None
        return self._complete()

    def finish(self) -> Path | None:
        """Block until the pending checkpoint is complete (SYNC)."""
        if self._pending is None:
            return None
        if self._thread is not None:
            self._thread.join()
        return self._complete()

    def _complete(self) -> Path:
        step, meta = self._pending
        self._pending = None
        tmp, final = self.directory / f".step-{step}.tmp", self.directory / f"step-{step}"
        mine = f"rank {self.rank} could not write its state ({_describe(self._error)})" if self._error else None
        problem = first_problem(self.comm, mine)  # SYNC: every rank's background write done, and how
        if self.rank == 0:
            if problem is None:
                try:
                    self._seal(step, meta, tmp, final)
                except OSError as err:
                    problem = f"rank 0 could not write its meta.json, {MANIFEST} or {DONE} ({_describe(err)})"
            if problem is not None:
                shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint would only fill the disk further
                problem = self._failed(step, problem)
        problem = self.comm.bcast(problem, root=0)  # SYNC: nobody reports the checkpoint before it is complete
        if problem:
            raise UsageError(problem)
        self.written.append(final)
        return final

    def _failed(self, step: int, problem: str) -> str:
        return f"checkpoint step-{step}: {problem}; earlier checkpoints in {self.directory} are untouched"

    def _seal(self, step: int, meta: dict, tmp: Path, final: Path) -> None:
        """Rank 0: meta.json, manifest, rename to ``step-<N>``, DONE, then prune to the newest ``keep``.
        On an OSError nothing named ``step-<N>`` is left incomplete."""
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"step": step, "files": {name: _sha256(tmp / name) for name in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        try:
            (final / DONE).write_text("ok\n")  # last: its presence means the directory is complete
            _fsync_dir(final)
            _fsync_dir(self.directory)
        except OSError:
            shutil.rmtree(final, ignore_errors=True)
            raise
        for old in complete_checkpoints(self.directory)[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """``step-<N>`` directories with a ``DONE`` marker, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        if p.name.startswith("step-") and p.name[5:].isdigit() and (p / DONE).is_file():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def verify(path: Path, rank: int) -> str | None:
    """None if ``path`` is a complete checkpoint whose meta and the file this rank resumes from
    (``state_file``) match the manifest; else what is wrong, in words."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"checkpoint {path.name} has no readable {MANIFEST}"
    if not (path / DONE).is_file():
        return f"checkpoint {path.name} is incomplete (no {DONE} marker)"
    for name in ("meta.json", state_file(manifest, rank)):
        expected = manifest.get("files", {}).get(name)
        if expected is None or not (path / name).is_file():
            return f"checkpoint {path.name} has no {name}"
        if _sha256(path / name) != expected:
            return f"checkpoint {path.name} is corrupt (checksum mismatch in {name})"
    return None


def state_file(manifest: dict, rank: int) -> str:
    """The rank file rank ``rank`` resumes from: its own, or, when the checkpoint was written by
    fewer or more ranks (N), rank ``rank % N``'s; whether that state may be used at another world
    size is ``Run.resize_problem``'s call."""
    saved = sum(1 for name in manifest.get("files", {}) if name.startswith("rank-"))
    return rank_file(rank % saved if saved else rank)


def load_rank(path: Path, rank: int) -> tuple[dict, dict]:
    """(this rank's state, the checkpoint's meta) from a verified checkpoint directory."""
    state = load(path / state_file(json.loads((path / MANIFEST).read_text()), rank))
    return state, json.loads((path / "meta.json").read_text())


# Options a resumed run may set differently from the run that wrote the checkpoint: where it reads
# and writes, how often it logs, evaluates and checkpoints, how long and how it waits on peers, how
# the same arithmetic is carried out (--allreduce: every algorithm owns the same ZeRO-1 shards;
# --data-io, --overlap, --device), and --steps (a resumed run may extend it; the learning-rate
# schedule follows the new value). Every other option shapes the saved state (model, optimizer,
# compressor residuals, ZeRO-1 shards over the bucket map) or what the run trains on (corpus,
# split, batch, seed, schedule) and must be what the checkpoint was written with.
RESUME_MAY_DIFFER = frozenset({
    "steps", "out", "resume", "ckpt_every", "ckpt_dir", "keep_ckpts", "log_every", "eval_every", "eval_batches",
    "sample", "trace", "trace_steps", "cache_dir", "comm_timeout", "comm_poll_us", "comm_priority", "max_bad_steps",
    "allreduce", "data_io", "overlap", "device",
})


def config_mismatch(saved: dict, current: dict) -> list[str]:
    """The options (``--name saved (this run: current)``) in which ``current`` differs from the
    ``saved`` config of a checkpoint, leaving out ``RESUME_MAY_DIFFER``; empty when it may resume.

    Does not compare an option that one side lacks (a checkpoint of an mpilm with other options):
    the state itself is then the judge, in ``Run.load_state_dict``.
    """
    return [f"--{name.replace('_', '-')} {saved[name]!r} (this run: {current[name]!r})"
            for name in current if name in saved and name not in RESUME_MAY_DIFFER and saved[name] != current[name]]
