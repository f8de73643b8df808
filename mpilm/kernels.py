"""The only door to mpilm's compiled kernels (``kernels/``), with a pure-torch twin of each.

Public API:
    load(verbose=False) -> module | None   build (first time, ~25 s) or load the C++ extension
    status() -> str                         "C++ (jit)", "C++ + CUDA (jit)" or "torch fallback (why)"
    topk(x, k, out_idx=None, out_val=None, *, backend="auto") -> (idx int32, val float32)
    residual_topk(grad, residual, k, out_idx=None, out_val=None, *, backend="auto") -> (idx, val)
    sparse_accumulate(dense, idx, val, *, backend="auto") -> dense
``backend``: "auto" (the kernel when built for the tensor's device, else torch), "kernel" (raise
if it is not available) or "torch".

The selection rule (see ``kernels/mpilm_kernels.h``) makes both paths return the same pairs bit
for bit: top-k = the k entries of largest magnitude key (the float's bits without the sign; inf
and NaN rank above every finite value), ties broken by the lowest index, pairs in increasing
index order. A threshold estimated from a strided sample (DGC's trick) only decides how much work
finding that set takes. ``sparse_accumulate`` adds pairs in array order, as a sequential loop
would, so duplicates sum identically everywhere (on CUDA the torch twin adds duplicates in rounds
of distinct indices to keep that order; the kernel sorts stably and sums each run in order).

Building: ``torch.utils.cpp_extension.load`` (ninja) into ``$MPILM_KERNELS_DIR`` or
``~/.cache/mpilm/kernels/<name>``, where the name carries a hash of the sources, the torch and
Python versions and the CUDA choice, so a change rebuilds instead of loading a stale module.
Concurrent ranks serialise on an ``fcntl`` lock next to the build directory: the first one
compiles, the others wait and then load the result (the lock dies with its holder, so a killed
build never leaves the others waiting). ``MPILM_KERNELS=torch`` forces the fallback. The CUDA
source is compiled only when torch sees a GPU and a CUDA toolkit is installed.

Limits: float32 data, int32 indices (n < 2^31). ``fcntl`` locks may not hold across nodes on
some network file systems; point ``MPILM_KERNELS_DIR`` at node-local storage there, or run
``make kernels`` once before the job.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import math
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

from mpilm.errors import UsageError

SOURCE_DIR = Path(__file__).resolve().parents[1] / "kernels"
CPU_SOURCE = "mpilm_kernels.cpp"
SHM_SOURCE = "mpilm_shm.cpp"  # the shared-memory allreduce of mpilm/comm/shm.py
CUDA_SOURCE = "mpilm_kernels.cu"
HEADER = "mpilm_kernels.h"
BACKENDS = ("auto", "kernel", "torch")
MAGNITUDE_MASK = 0x7FFFFFFF

# mirrored from kernels/mpilm_kernels.h (sample_plan): same sample, same thresholds tried
SAMPLE_HITS_PER_K = 256.0
MIN_SAMPLE = 1024

_lock = threading.Lock()
_tried = False
_module = None
_reason = "not loaded yet"


# ---------------------------------------------------------------- building and loading
def _choice() -> str:
    value = os.environ.get("MPILM_KERNELS", "auto").strip() or "auto"
    if value not in ("auto", "torch"):
        raise UsageError(f"MPILM_KERNELS={value}: expected auto (build the C++ kernels) or torch (pure-torch fallback)")
    return value


def _cuda_wanted() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, ""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False, "CUDA kernels not built: no CUDA toolkit (nvcc) found"
    return True, ""


def cache_root() -> Path:
    return Path(os.environ.get("MPILM_KERNELS_DIR") or Path.home() / ".cache" / "mpilm" / "kernels")


def _build_name(with_cuda: bool) -> str:
    digest = hashlib.sha256()
    for name in (HEADER, CPU_SOURCE, SHM_SOURCE) + ((CUDA_SOURCE,) if with_cuda else ()):
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(f"{torch.__version__}|{platform.python_version()}|{platform.machine()}|cuda={with_cuda}".encode())
    return f"mpilm_kernels_{digest.hexdigest()[:12]}"


def _build(verbose: bool):
    """Compile (or find compiled) and import the extension; returns (module, note) or raises."""
    from torch.utils import cpp_extension

    with_cuda, cuda_note = _cuda_wanted()
    name = _build_name(with_cuda)
    root = cache_root()
    build_dir = root / name
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(SOURCE_DIR / name) for name in (CPU_SOURCE, SHM_SOURCE)]
    sources += [str(SOURCE_DIR / CUDA_SOURCE)] if with_cuda else []
    defines = ["-DMPILM_WITH_CUDA"] if with_cuda else []
    built = build_dir / f"{name}.so"
    if built.is_file():
        # the name hashes the sources, torch, Python and the machine: a module of that name is
        # these sources, built; import it without ninja or the lock (every rank of every run
        # otherwise waits its turn for ninja to say "no work to do", seconds each on a busy node)
        try:
            spec = importlib.util.spec_from_file_location(name, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module, cuda_note
        except ImportError:
            pass  # a half-written file from a killed build: build it again below, under the lock
    with open(root / f"{name}.lock", "w") as lock_file:
        # blocks while another process (another rank of this node) compiles the same sources
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            # torch's own baton file: any one present now was left by a killed build (we hold the lock)
            (build_dir / "lock").unlink(missing_ok=True)
            module = cpp_extension.load(
                name=name,
                sources=sources,
                extra_cflags=["-O3", "-fopenmp", *defines],
                extra_cuda_cflags=["-O3", *defines],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                verbose=verbose,
            )
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return module, cuda_note


def load(verbose: bool = False):
    """The compiled module, building it on first use; None (see ``status()``) when unavailable."""
    global _tried, _module, _reason
    with _lock:
        if _tried:
            return _module
        _tried = True
        if _choice() == "torch":
            _reason = "MPILM_KERNELS=torch"
            return None
        if not (SOURCE_DIR / CPU_SOURCE).is_file():
            _reason = f"sources not found in {SOURCE_DIR}"
            return None
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            _reason = f"no C++ compiler ({compiler}) on PATH"
            return None
        from torch.utils.cpp_extension import is_ninja_available

        if not is_ninja_available():
            _reason = "ninja is not installed"
            return None
        try:
            _module, cuda_note = _build(verbose)
        except Exception as err:  # noqa: BLE001 - any build failure means: run the torch path and say why
            log = cache_root() / "last_build_error.log"
            try:
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text(f"{type(err).__name__}: {err}\n")
                where = f", see {log}"
            except OSError:
                where = ""
            _reason = f"build failed ({type(err).__name__}{where})"
            if verbose:
                print(f"mpilm.kernels: {_reason}\n{err}", file=sys.stderr, flush=True)
            return None
        _reason = "C++ + CUDA (jit)" if _module.with_cuda() else "C++ (jit)"
        if cuda_note:
            _reason += f" ({cuda_note})"
        return _module


def status() -> str:
    """One line for banners: which path ``backend="auto"`` takes, and why when it is the fallback."""
    module = load()
    return _reason if module is not None else f"torch fallback ({_reason})"


def _kernel_for(t: torch.Tensor, backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return None
    module = load()
    usable = module is not None and (t.device.type == "cpu" or (t.is_cuda and module.with_cuda()))
    if usable:
        return module
    if backend == "kernel":
        raise RuntimeError(f"mpilm.kernels: no compiled kernel for {t.device.type} tensors: {status()}")
    return None


# ---------------------------------------------------------------- checks shared by both paths
def _check_vector(t: torch.Tensor, name: str) -> None:
    if t.dtype != torch.float32 or t.dim() != 1 or not t.is_contiguous():
        raise TypeError(f"{name}: expected a contiguous 1-D float32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if t.numel() >= 2**31:
        raise ValueError(f"{name}: {t.numel()} elements; indices are int32, so buckets must stay below 2^31")


def _outputs(ref: torch.Tensor, k: int, out_idx, out_val):
    if not 0 <= k <= ref.numel():
        raise ValueError(f"k = {k}: expected 0 <= k <= {ref.numel()}")
    if out_idx is None:
        out_idx = torch.empty(k, dtype=torch.int32, device=ref.device)
    if out_val is None:
        out_val = torch.empty(k, dtype=torch.float32, device=ref.device)
    for t, dtype, name in ((out_idx, torch.int32, "out_idx"), (out_val, torch.float32, "out_val")):
        if t.dtype != dtype or t.numel() != k or not t.is_contiguous() or t.device != ref.device:
            raise ValueError(f"{name}: expected a contiguous {dtype} tensor of {k} elements on {ref.device}")
    return out_idx, out_val


# ---------------------------------------------------------------- the torch twins
def _sample_plan(n: int, k: int) -> tuple[int, int, int, int, int]:
    """(size, stride, offset, rank_near, rank_far): kernels/mpilm_kernels.h sample_plan, in Python."""
    want = math.ceil(SAMPLE_HITS_PER_K * n / k)
    size = n if want >= n else min(n, max(want, MIN_SAMPLE))
    stride = n // size
    expected = size * k / n
    near = min(size, math.ceil(expected + 3.0 * math.sqrt(expected)) + 1)
    return size, stride, stride // 2, near, min(size, 8 * near)


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 magnitude key of every element (the selection order; see the module docstring)."""
    return x.view(torch.int32) & MAGNITUDE_MASK


def _torch_select(x: torch.Tensor, k: int) -> torch.Tensor:
    """int64 indices (increasing) of the top-k of x by magnitude key, lowest index on ties."""
    n = x.numel()
    if k == n:
        return torch.arange(n, device=x.device)
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    keys = magnitude_keys(x)
    size, stride, offset, near, far = _sample_plan(n, k)
    top_sample = keys[offset: offset + size * stride: stride].topk(far).values  # descending
    near_t, far_t = max(int(top_sample[near - 1]), 1), max(int(top_sample[far - 1]), 1)
    attempts = [near_t] + ([far_t] if far_t < near_t else []) + [0]
    for t in attempts:
        cand = torch.arange(n, device=x.device) if t == 0 else (keys >= t).nonzero().squeeze(1)
        if cand.numel() >= k:
            break
    if cand.numel() == k:
        return cand
    cand_keys = keys[cand]
    boundary = cand_keys.kthvalue(cand.numel() - k + 1).values  # the k-th largest key
    above = cand_keys > boundary
    ties = cand_keys == boundary
    ties_wanted = k - int(above.sum())
    return cand[above | (ties & (ties.cumsum(0) <= ties_wanted))]


def _torch_sparse_accumulate(dense: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> None:
    if idx.numel() == 0:
        return
    lowest, highest = int(idx.min()), int(idx.max())
    if lowest < 0 or highest >= dense.numel():
        raise IndexError(f"sparse_accumulate: index out of range [0, {dense.numel()}): {lowest if lowest < 0 else highest}")
    if dense.device.type == "cpu":
        # CPU index_add_ on a 1-D tensor is one sequential loop in array order (checked by the tests)
        dense.index_add_(0, idx, val)
        return
    # CUDA index_add_ adds duplicates atomically in any order: add in rounds where each index
    # appears at most once, round r holding every index's r-th occurrence, which keeps array order
    order = torch.sort(idx, stable=True).indices
    sorted_idx = idx[order]
    starts = torch.ones_like(sorted_idx, dtype=torch.bool)
    starts[1:] = sorted_idx[1:] != sorted_idx[:-1]
    positions = torch.arange(idx.numel(), device=idx.device)
    run_start = torch.cummax(torch.where(starts, positions, torch.zeros_like(positions)), 0).values
    occurrence = positions - run_start
    for r in range(int(occurrence.max()) + 1):
        pick = order[occurrence == r]
        dense.index_add_(0, idx[pick], val[pick])


# ---------------------------------------------------------------- public operations
def topk(x: torch.Tensor, k: int, out_idx=None, out_val=None, *, backend: str = "auto"):
    """Top-k of ``x`` by magnitude (exact; lowest index on ties) as (int32 idx, float32 val), index order."""
    _check_vector(x, "x")
    out_idx, out_val = _outputs(x, k, out_idx, out_val)
    module = _kernel_for(x, backend)
    if module is not None:
        module.topk(x, k, out_idx, out_val)
        return out_idx, out_val
    sel = _torch_select(x, k)
    out_idx.copy_(sel)
    torch.index_select(x, 0, sel, out=out_val)
    return out_idx, out_val


def residual_topk(grad: torch.Tensor, residual: torch.Tensor, k: int, out_idx=None, out_val=None, *,
                  backend: str = "auto"):
    """Error feedback in one pass: ``residual += grad``, pairs = top-k of ``residual``, those entries zeroed.

    Afterwards ``scatter(pairs) + residual == grad + old residual`` exactly (one fp32 add per element).
    """
    _check_vector(grad, "grad")
    _check_vector(residual, "residual")
    if grad.numel() != residual.numel() or grad.device != residual.device:
        raise ValueError("residual_topk: grad and residual must have the same size and device")
    out_idx, out_val = _outputs(grad, k, out_idx, out_val)
    module = _kernel_for(grad, backend)
    if module is not None:
        module.residual_topk(grad, residual, k, out_idx, out_val)
        return out_idx, out_val
    residual.add_(grad)
    sel = _torch_select(residual, k)
    out_idx.copy_(sel)
    torch.index_select(residual, 0, sel, out=out_val)
    residual.index_fill_(0, sel, 0.0)
    return out_idx, out_val


def sparse_accumulate(dense: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, *, backend: str = "auto"):
    """``dense[idx[j]] += val[j]`` for every j, in array order (duplicates summed in that order)."""
    _check_vector(dense, "dense")
    if idx.dtype != torch.int32 or idx.dim() != 1 or not idx.is_contiguous():
        raise TypeError(f"idx: expected a contiguous 1-D int32 tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
    if val.dtype != torch.float32 or not val.is_contiguous() or val.numel() != idx.numel():
        raise TypeError("val: expected a contiguous float32 tensor as long as idx")
    if idx.device != dense.device or val.device != dense.device:
        raise ValueError("sparse_accumulate: dense, idx and val must be on one device")
    module = _kernel_for(dense, backend)
    if module is not None:
        module.sparse_accumulate(dense, idx, val)
    else:
        _torch_sparse_accumulate(dense, idx, val)
    return dense


def main() -> int:
    """``python -m mpilm.kernels`` (``make kernels``): build ahead of time; exit 1 when not possible."""
    try:
        module = load(verbose="-v" in sys.argv[1:])
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"mpilm kernels: {status()}; cache {cache_root()}")
    return 0 if module is not None else 1


if __name__ == "__main__":
    sys.exit(main())
