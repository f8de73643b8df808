"""Checkpoints that survive crashes: atomic save, verified load.

``save(path, state)`` writes to a temporary file in the same directory, fsyncs it and renames it
over the target, so a reader sees either the previous complete file or the new complete file,
never a torn one. Every file carries ``format`` and ``version`` keys; ``load`` refuses files that
are not mpilm checkpoints of a known version, with a message that says what to do.

``save``/``load``: one file (``model.pt`` at the end of a run; only rank 0 writes it, the
parameters being identical on every rank). ``Writer``/``complete_checkpoints``/``verify``/
``load_rank``: training checkpoints, one directory per step holding every rank's state.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch
from mpi4py import MPI

from mpilm.errors import UsageError


FORMAT = "mpilm-checkpoint"
VERSION = 1


def save(path: str | os.PathLike, state: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    payload = {"format": FORMAT, "version": VERSION, **state}
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


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
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
            tmp.mkdir(parents=True)
        self.comm.Barrier()  # SYNC: the directory exists before any rank writes into it
        self._pending, self._error = (step, meta), None
        self._thread = threading.Thread(target=self._write, args=(tmp / rank_file(self.rank), state),
                                        name="mpilm-ckpt", daemon=True)
        self._thread.start()
        self.stalls.append(time.perf_counter() - t0)

    def _write(self, path: Path, state: dict) -> None:
        try:
            with open(path, "wb") as fh:
                torch.save({"format": FORMAT, "version": VERSION, **state}, fh)
                fh.flush()
                os.fsync(fh.fileno())
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
        failed = self.comm.allgather(f"{type(self._error).__name__}: {self._error}" if self._error else None)
        bad = [(r, e) for r, e in enumerate(failed) if e]
        if bad:
            r, e = bad[0]
            raise UsageError(f"checkpoint step-{step}: rank {r} could not write its state ({e}); "
                             f"earlier checkpoints in {self.directory} are untouched")
        tmp, final = self.directory / f".step-{step}.tmp", self.directory / f"step-{step}"
        if self.rank == 0:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            files = sorted(p.name for p in tmp.iterdir())
            manifest = {"step": step, "files": {name: _sha256(tmp / name) for name in files}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            _fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            (final / DONE).write_text("ok\n")  # last: its presence means the directory is complete
            _fsync_dir(final)
            _fsync_dir(self.directory)
            for old in complete_checkpoints(self.directory)[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        self.comm.Barrier()  # SYNC: nobody reports the checkpoint before it is complete
        self.written.append(final)
        return final


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
    """None if ``path`` is a complete checkpoint whose meta and this rank's file match the manifest;
    else what is wrong, in words."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"checkpoint {path.name} has no readable {MANIFEST}"
    if not (path / DONE).is_file():
        return f"checkpoint {path.name} is incomplete (no {DONE} marker)"
    for name in ("meta.json", rank_file(rank)):
        expected = manifest.get("files", {}).get(name)
        if expected is None or not (path / name).is_file():
            return f"checkpoint {path.name} has no {name}"
        if _sha256(path / name) != expected:
            return f"checkpoint {path.name} is corrupt (checksum mismatch in {name})"
    return None


def load_rank(path: Path, rank: int) -> tuple[dict, dict]:
    """(this rank's state, the checkpoint's meta) from a verified checkpoint directory."""
    state = load(path / rank_file(rank))
    return state, json.loads((path / "meta.json").read_text())
