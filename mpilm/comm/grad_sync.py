"""One flat gradient buffer per dtype, cut into buckets, averaged over the ranks.

Every ``param.grad`` is a view into the flat buffer, so backward writes gradients straight into
the memory the collectives reduce: no copy into or out of buckets. Parameters are laid out in
*reverse* registration order, the order their gradients become ready in backward, so each bucket
is one contiguous slice that later work can start reducing as soon as backward has filled it.

The bucket map depends only on the parameter shapes and ``bucket_bytes``; it is checked to be
identical on every rank at start (a mismatch means ranks built different models, and would
otherwise corrupt gradients silently or hang).

With ``shared_memory=True`` (CPU only) the flat buffers are allocated in an MPI-3 shared-memory
window (``shm.alloc_shared_buffer``), so the ``shm`` and ``hier`` allreduces read every peer's
gradients where backward wrote them, with no copy into shared memory first; other algorithms
treat the buffer as ordinary memory.

Limits: the optimizer must zero gradients through ``GradBuffer.zero_()`` (or
``zero_grad(set_to_none=False)``): ``set_to_none=True`` would detach the views. Buckets are
reduced one after another after backward (overlap with backward is not done here).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch
from mpi4py import MPI

from mpilm import timing
from mpilm.comm import collectives, shm, world


@dataclass
class Bucket:
    index: int
    dtype: torch.dtype
    start: int  # element offsets into the flat buffer of this dtype
    stop: int
    names: list[str] = field(default_factory=list)
    view: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return (self.stop - self.start) * self.view.element_size()


class GradBuffer:
    def __init__(self, named_params, bucket_bytes: float, comm: MPI.Comm, device: torch.device | str = "cpu",
                 shared_memory: bool = False):
        self.comm = comm
        params = [(n, p) for n, p in named_params if p.requires_grad]
        if not params:
            raise ValueError("GradBuffer: the model has no trainable parameters")
        self.params = [p for _, p in params]
        self.flat: dict[torch.dtype, torch.Tensor] = {}
        self.buckets: list[Bucket] = []
        self._expected_ptr: list[tuple[torch.nn.Parameter, int]] = []

        dtypes = list(dict.fromkeys(p.dtype for _, p in params))
        for dtype in dtypes:
            group = [(n, p) for n, p in reversed(params) if p.dtype == dtype]  # gradient-ready order
            total = sum(p.numel() for _, p in group)
            if shared_memory and torch.device(device).type == "cpu" and dtype in shm.SUPPORTED_DTYPES:
                # collective over the node: peers' shm reductions read these gradients in place
                flat = shm.alloc_shared_buffer(total, dtype, comm)
                flat.zero_()
            else:
                flat = torch.zeros(total, dtype=dtype, device=device)
            self.flat[dtype] = flat
            offset, bucket = 0, None
            for name, p in group:
                p.grad = flat[offset:offset + p.numel()].view_as(p)
                self._expected_ptr.append((p, p.grad.data_ptr()))
                if bucket is None:
                    bucket = Bucket(len(self.buckets), dtype, offset, offset)
                offset += p.numel()
                bucket.stop = offset
                bucket.names.append(name)
                if bucket.stop - bucket.start >= bucket_bytes / flat.element_size():
                    self._close(bucket, flat)
                    bucket = None
            if bucket is not None:
                self._close(bucket, flat)
        self._check_identical_map()

    def _close(self, bucket: Bucket, flat: torch.Tensor) -> None:
        bucket.view = flat[bucket.start:bucket.stop]
        self.buckets.append(bucket)

    def signature(self) -> str:
        text = ";".join(f"{b.dtype}:{b.start}:{b.stop}:{','.join(b.names)}" for b in self.buckets)
        return hashlib.sha256(text.encode()).hexdigest()

    def _check_identical_map(self) -> None:
        # start-up only, so the pickle-based allgather is fine; blocks until every rank built its map
        signatures = self.comm.allgather(self.signature())
        if len(set(signatures)) != 1:
            bad = [r for r, s in enumerate(signatures) if s != signatures[0]]
            raise RuntimeError(f"gradient bucket map differs on ranks {bad} from rank 0: the ranks built different models")

    # ---- per step
    def zero_(self) -> None:
        for flat in self.flat.values():
            flat.zero_()

    def check_views(self) -> None:
        """Autograd must have accumulated into our views; anything else would silently skip sync."""
        for p, ptr in self._expected_ptr:
            if p.grad is None or p.grad.data_ptr() != ptr:
                raise RuntimeError(
                    "a parameter's .grad no longer points into the flat gradient buffer "
                    "(was zero_grad(set_to_none=True) called, or .grad replaced?)")

    def sync(self, reduce_bucket=None, algorithm: str = "auto") -> float:
        """Average every bucket over the ranks, in place. Returns seconds spent.

        ``reduce_bucket(view, index)`` replaces the plain allreduce (a compressor's entry point).
        Blocks until every rank has contributed each bucket.
        """
        t0 = time.perf_counter()
        for bucket in self.buckets:
            # one trace event per bucket when a --trace is recording (a shared no-op otherwise)
            with timing.traced("communication", f"allreduce b{bucket.index}", bucket=bucket.index,
                               bytes=bucket.nbytes, algorithm=algorithm if reduce_bucket is None else "compressed"):
                if reduce_bucket is None:
                    collectives.allreduce(bucket.view, self.comm, algorithm, "avg")
                else:
                    reduce_bucket(bucket.view, bucket.index)
        return time.perf_counter() - t0

    def global_norm(self) -> torch.Tensor:
        norms = [flat.float().norm() for flat in self.flat.values()]
        return torch.stack(norms).norm()

    def clip_(self, max_norm: float) -> torch.Tensor:
        """Scale all gradients so their global norm is at most ``max_norm``; returns the norm before."""
        norm = self.global_norm()
        if max_norm > 0:
            scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for flat in self.flat.values():
                flat.mul_(scale.to(flat.dtype))
        return norm

    @property
    def numel(self) -> int:
        return sum(f.numel() for f in self.flat.values())


def broadcast_(tensors, comm: MPI.Comm, root: int = 0) -> None:
    """Make ``tensors`` on every rank equal to ``root``'s, through one flat buffer per dtype.

    Used once at start so every rank begins from identical parameters. Blocks until root sends.
    """
    tensors = list(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in group]).contiguous()
        if comm.Get_size() > 1:
            staged = flat.cpu() if flat.is_cuda and not world.cuda_aware() else flat
            comm.Bcast(world.buf(staged), root=root)
            if staged is not flat:
                flat.copy_(staged)
        offset = 0
        with torch.no_grad():
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
