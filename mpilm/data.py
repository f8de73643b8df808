"""Corpus -> tokens -> one contiguous block per rank, and the batch sampler.

- Corpus: a text file, or every regular file below a directory (sorted), read as bytes; the
  default is the running interpreter's standard library ``.py`` files (~30 MB on every machine).
- Tokenizer: bytes (vocab 256). UTF-8 text and undecodable bytes alike are kept byte for byte.
- Token cache: rank 0 tokenizes once into ``<cache-dir>/tokens-<key>.bin`` where the key hashes the
  file list, sizes and mtimes. The file has a versioned 64-byte header (magic, version, header
  size, itemsize, vocab, token count) and is written atomically (temp file + rename), so a crash
  never leaves a half cache that a later run trusts.
- Ownership: the last ``val_fraction`` of tokens is validation (replicated: it is small); of the D
  training tokens, rank r owns ``[r*D//N, (r+1)*D//N)``. Transport: ``scatter`` (rank 0 reads and
  ``Scatterv``s) or ``mpiio`` (each rank reads its range with a collective ``Read_at_all``; rank 0
  never holds more than its own block).
- Sampler: random windows of ``block_size + 1`` tokens from the rank's own block, RNG seeded from
  (seed, rank, step, micro-step) so any step's batch can be recomputed.

Limits: one token type per cache (uint8 for bytes); the corpus is read whole by rank 0 when the
cache is built. Errors in the input (missing path, empty or too small corpus) are decided on rank
0 and broadcast, so every rank raises the same ``UsageError``.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from mpilm.errors import UsageError

MAGIC = b"MPILMTOK"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQ32x")  # magic, version, header bytes, itemsize, vocab, n_tokens
assert HEADER.size == 64
BYTE_VOCAB = 256


# ---------------------------------------------------------------- corpus and cache (rank 0)
def default_corpus() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(data: str | None, exclude: Path | None = None) -> list[Path]:
    """The files of the corpus, sorted, leaving out anything below ``exclude`` (the token cache,
    should it live inside the corpus directory). Raises UsageError for a missing path or an empty
    corpus."""
    if data is None:
        root = default_corpus()
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
        label = f"the standard library at {root}"
    else:
        root = Path(data).expanduser()
        if not root.exists():
            raise UsageError(f"--data {data}: no such file or directory")
        if root.is_file():
            files = [root]
        else:
            files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        if exclude is not None:
            excluded = exclude.resolve()
            files = [p for p in files if not p.resolve().is_relative_to(excluded)]
        label = f"--data {data}"
    if not files:
        raise UsageError(f"{label}: no files to read")
    return files


def cache_key(files: list[Path]) -> str:
    h = hashlib.sha256(f"bytes-v{VERSION}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def write_token_file(path: Path, tokens: np.ndarray, vocab: int) -> None:
    """Header + tokens, atomically: a reader sees the old file, no file, or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(HEADER.pack(MAGIC, VERSION, HEADER.size, tokens.itemsize, vocab, tokens.size))
        fh.write(tokens.tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        raw = fh.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise ValueError(f"{path}: truncated header")
    magic, version, header_bytes, itemsize, vocab, n_tokens = HEADER.unpack(raw)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"{path}: not an mpilm token file of version {VERSION}")
    expected = header_bytes + itemsize * n_tokens
    if path.stat().st_size != expected:
        raise ValueError(f"{path}: size {path.stat().st_size} != {expected} from its header")
    return dict(header_bytes=header_bytes, itemsize=itemsize, vocab=vocab, n_tokens=n_tokens)


def build_cache(data: str | None, cache_dir: str) -> tuple[Path, dict, bool]:
    """Rank 0 only: find or build the token file. Returns (path, header, built_now)."""
    files = corpus_files(data, exclude=Path(cache_dir).expanduser())
    path = Path(cache_dir).expanduser() / f"tokens-{cache_key(files)}.bin"
    if path.exists():
        try:
            return path, read_header(path), False
        except (ValueError, OSError):
            pass  # a stale, foreign or unreadable file under our name: rebuild it
    chunks = []
    for p in files:
        try:
            chunks.append(np.fromfile(p, dtype=np.uint8))
        except OSError as err:  # unreadable (permissions), or gone since it was listed
            raise UsageError(f"--data {data or default_corpus()}: cannot read {p} ({err.strerror or err})") from None
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
    if tokens.size == 0:
        raise UsageError(f"--data {data or default_corpus()}: the corpus has no bytes")
    try:
        write_token_file(path, tokens, BYTE_VOCAB)
    except OSError as err:
        raise UsageError(f"--cache-dir {cache_dir}: cannot write the token cache ({err.strerror})") from None
    return path, read_header(path), True


# ---------------------------------------------------------------- ownership
def block_range(n_train: int, world_size: int, r: int) -> tuple[int, int]:
    """Rank r's contiguous slice of the training tokens: every token owned by exactly one rank."""
    return r * n_train // world_size, (r + 1) * n_train // world_size


def split_sizes(n_tokens: int, val_fraction: float) -> tuple[int, int]:
    n_val = int(n_tokens * val_fraction)
    return n_tokens - n_val, n_val


@dataclass
class Corpus:
    block: torch.Tensor  # this rank's training tokens (CPU; uint8 for the byte tokenizer)
    val: torch.Tensor  # all validation tokens (replicated)
    vocab_size: int
    n_train: int  # D, over all ranks
    cache_path: str
    built_now: bool


def _numpy_dtype(itemsize: int):
    return {1: np.uint8, 2: np.uint16, 4: np.uint32}[itemsize]


def load(comm: MPI.Comm, data: str | None, cache_dir: str, val_fraction: float, block_size: int,
         io: str = "scatter") -> Corpus:
    """Collective: every rank returns its block; input problems raise the same UsageError everywhere."""
    r, n = comm.Get_rank(), comm.Get_size()
    verdict = None
    if r == 0:
        try:
            path, header, built = build_cache(data, cache_dir)
            n_train, n_val = split_sizes(header["n_tokens"], val_fraction)
            need = n * (block_size + 1)
            if n_train // n < block_size + 1:
                raise UsageError(
                    f"corpus too small: {n_train} training tokens cannot give {n} ranks a block of at least "
                    f"--block-size+1 = {block_size + 1} tokens each (need >= {need}); use more data or fewer ranks")
            if n_val < block_size + 1:
                raise UsageError(
                    f"corpus too small: {n_val} validation tokens (--val-fraction {val_fraction}) are fewer than "
                    f"--block-size+1 = {block_size + 1}; use more data or a larger --val-fraction")
            verdict = dict(path=str(path), built=built, n_train=n_train, n_val=n_val, **header)
        except UsageError as err:
            verdict = dict(error=str(err))
    verdict = comm.bcast(verdict, root=0)  # blocks until rank 0 has built or found the cache
    if "error" in verdict:
        raise UsageError(verdict["error"])

    dtype = _numpy_dtype(verdict["itemsize"])
    lo, hi = block_range(verdict["n_train"], n, r)
    block = np.empty(hi - lo, dtype)
    val = np.empty(verdict["n_val"], dtype)
    base = from_numpy_dtype(dtype)
    if io == "mpiio":
        fh = MPI.File.Open(comm, verdict["path"], MPI.MODE_RDONLY)
        try:
            # collective read: every rank reads its own range straight from the file
            fh.Read_at_all(verdict["header_bytes"] + lo * verdict["itemsize"], [block, base])
            fh.Read_at_all(verdict["header_bytes"] + verdict["n_train"] * verdict["itemsize"], [val, base])
        finally:
            fh.Close()
    else:
        tokens = None
        if r == 0:
            tokens = np.fromfile(verdict["path"], dtype=dtype, offset=verdict["header_bytes"])
        bounds = [block_range(verdict["n_train"], n, q) for q in range(n)]
        counts, displs = [hi - lo for lo, hi in bounds], [lo for lo, _ in bounds]
        # blocks until rank 0 has sent every rank its block
        comm.Scatterv([tokens, counts, displs, base] if r == 0 else None, [block, base], root=0)
        if r == 0:
            val[:] = tokens[verdict["n_train"]:]
        comm.Bcast([val, base], root=0)
    return Corpus(
        block=_as_tensor(block), val=_as_tensor(val),
        vocab_size=verdict["vocab"], n_train=verdict["n_train"], cache_path=verdict["path"], built_now=verdict["built"],
    )


def _as_tensor(tokens: np.ndarray) -> torch.Tensor:
    """Tokens stay in their compact type (uint8 for bytes); windows are widened when sampled."""
    return torch.from_numpy(tokens if tokens.dtype == np.uint8 else tokens.astype(np.int64))


# ---------------------------------------------------------------- sampling
def batch_generator(seed: int, rank: int, step: int, micro: int = 0) -> torch.Generator:
    """A generator whose state depends only on (seed, rank, step, micro): batches are recomputable."""
    mixed = hashlib.blake2b(f"{seed}/{rank}/{step}/{micro}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(mixed, "little") & ((1 << 63) - 1))


def windows(tokens: torch.Tensor, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = starts[:, None] + torch.arange(block_size + 1)[None, :]
    chunk = tokens[offsets].long()
    return chunk[:, :-1], chunk[:, 1:]


def sample_batch(block: torch.Tensor, batch_size: int, block_size: int, seed: int, rank: int, step: int,
                 micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape [batch_size, block_size] drawn from this rank's own block."""
    g = batch_generator(seed, rank, step, micro)
    starts = torch.randint(0, block.numel() - block_size, (batch_size,), generator=g)
    return windows(block, starts, block_size)


def eval_starts(n_val: int, block_size: int, n_windows: int, seed: int) -> torch.Tensor:
    """Fixed validation windows, independent of the number of ranks (so val loss is comparable)."""
    g = batch_generator(seed, -1, -1)
    return torch.randint(0, n_val - block_size, (n_windows,), generator=g)
