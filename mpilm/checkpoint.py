"""Checkpoints that survive crashes: atomic save, verified load.

``save(path, state)`` writes to a temporary file in the same directory, fsyncs it and renames it
over the target, so a reader sees either the previous complete file or the new complete file,
never a torn one. Every file carries ``format`` and ``version`` keys; ``load`` refuses files that
are not mpilm checkpoints of a known version, with a message that says what to do.

Only rank 0 writes (parameters are identical on every rank in synchronous training).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

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
