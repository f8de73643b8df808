"""End-of-run figures of a training run, from per-step means averaged over ranks.

Does: ``run_metrics`` turns ``PhaseTimer.rank_stats`` means (averaged over ranks by the caller)
into tokens/s (total and per rank), model FLOP/s, MFU from a table of bf16 dense peaks
(``PEAK_BF16_FLOPS``, matched against the CUDA device name: ``device_name``, ``peak_flops``),
bytes sent and received per step, bus bandwidth (nccl-tests convention), wire bandwidth, and the
exposed and total comm/compute ratios; ``format_run_metrics`` writes them as two lines.

Does not: time anything (``mpilm.timing``), talk MPI (the caller averages over ranks), print,
or know about models beyond the FLOPs per token handed in.

Limits: MFU assumes one device per rank and the bf16 dense peak; it is None on CPUs and on GPUs
missing from the table. busbw and wire bandwidth are None on one rank or when no collective
time was credited. Pure functions, safe from any thread.
"""

from __future__ import annotations

import math
import re

import torch

# bf16 dense tensor-core peaks (FLOP/s, no sparsity) from the vendors' datasheets, matched in
# order against torch.cuda.get_device_name(); the more specific names come first.
PEAK_BF16_FLOPS = (
    (r"GH200", 989e12),
    (r"H200", 989e12),
    (r"H100.*NVL", 835e12),
    (r"H100.*PCIe", 756e12),
    (r"H100|H800", 989e12),
    (r"B200", 2250e12),
    (r"A100|A800", 312e12),
    (r"L40S", 362e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
)


def device_name(device: torch.device | str) -> str | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device)


def peak_flops(name: str | None) -> float | None:
    """Peak bf16 dense FLOP/s of one device named ``name``; None for CPUs and unknown devices."""
    if not name:
        return None
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, name):
            return flops
    return None


def hidden_share(exposed_s: float, total_s: float) -> float | None:
    """The share of collective time that backward hid: 1 - exposed / total, clamped to [0, 1].

    ``exposed_s`` is the time the step waited in its comm phase, ``total_s`` the time the
    collectives ran. The exposed wait can exceed the collectives' own time: a rank that finishes
    backward first waits there for its slower peers too, which is skew, not communication; such a
    step hid nothing (0), it did not hide "less than nothing". None when nothing was communicated.
    """
    if total_s <= 0:
        return None
    return min(1.0, max(0.0, 1.0 - exposed_s / total_s))


def run_metrics(stats: dict[str, float], *, world_size: int, tokens_per_step: int, flops_per_token: float,
                payload_bytes: int, device: torch.device | str = "cpu") -> dict:
    """End-of-run figures from per-step means averaged over ranks (``PhaseTimer.rank_stats``).

    ``tokens_per_step``: over all ranks; ``payload_bytes``: gradient bytes allreduced per step.
    busbw follows nccl-tests: payload / comm_total x 2(p-1)/p, the per-rank link traffic a
    bandwidth-optimal allreduce needs, comparable across world sizes and algorithms;
    ``wire_gbps`` is what this rank actually handed to MPI per second of collective time.
    MFU assumes one device per rank and the bf16 peak (training runs bf16 autocast on CUDA).
    """
    p = world_size
    step = stats["step_s"]
    tokens_per_s = tokens_per_step / step if step > 0 else 0.0
    model_flops = flops_per_token * tokens_per_s
    peak = peak_flops(device_name(device))
    comm_total = stats["comm_total_s"]
    moving = p > 1 and comm_total > 0
    return {
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_rank": tokens_per_s / p,
        "step_s_mean": step,
        "compute_s_per_step": stats["compute_s"],
        "comm_s_per_step": stats["comm_s"],
        "comm_total_s_per_step": comm_total,
        "comm_hidden_share": hidden_share(stats["comm_s"], comm_total),
        "comm_compute_ratio": stats["comm_s"] / stats["compute_s"] if stats["compute_s"] > 0 else 0.0,
        "comm_total_compute_ratio": comm_total / stats["compute_s"] if stats["compute_s"] > 0 else 0.0,
        "model_flops_per_s": model_flops,
        "peak_flops_per_device": peak,
        "mfu": model_flops / (peak * p) if peak else None,
        "gradient_bytes": payload_bytes,
        "bytes_sent_per_step": stats["bytes_sent"],
        "bytes_received_per_step": stats["bytes_received"],
        "bytes_shm_read_per_step": stats.get("bytes_shm_read", 0.0),
        "bytes_shm_written_per_step": stats.get("bytes_shm_written", 0.0),
        "busbw_gbps": payload_bytes * 2 * (p - 1) / p / comm_total / 1e9 if moving else None,
        "wire_gbps": stats["bytes_sent"] / comm_total / 1e9 if moving else None,
    }


def format_run_metrics(m: dict) -> str:
    """Two lines for the end of a run: throughput and compute, then communication."""
    mfu = f" | MFU {m['mfu']:.1%}" if m["mfu"] is not None else ""
    shm_read, shm_written = m.get("bytes_shm_read_per_step", 0.0), m.get("bytes_shm_written_per_step", 0.0)
    shm = (f", {_si(shm_read)}B read from and {_si(shm_written)}B written to node peers' shared memory"
           if shm_read or shm_written else "")
    busbw = (f" | busbw {m['busbw_gbps']:.2f} GB/s (wire {m['wire_gbps']:.2f} GB/s)"
             if m["busbw_gbps"] is not None else "")
    return (f"throughput: {m['tokens_per_s']:,.0f} tok/s ({m['tokens_per_s_per_rank']:,.0f} per rank) | "
            f"model {_si(m['model_flops_per_s'])}FLOP/s{mfu}\n"
            f"communication: {_si(m['bytes_sent_per_step'])}B sent, {_si(m['bytes_received_per_step'])}B received "
            f"per step per rank through MPI{shm}{busbw} | comm/compute {m['comm_compute_ratio']:.2f} exposed, "
            f"{m['comm_total_compute_ratio']:.2f} total")


def _si(x: float) -> str:
    """1234567 -> '1.23 M' (SI prefixes; the unit follows)."""
    if not x or not math.isfinite(x):
        return f"{x or 0:.0f} "
    exponent = min(4, max(0, int(math.floor(math.log10(abs(x)) / 3))))
    return f"{x / 1000 ** exponent:.3g} {' kMGT'[exponent].strip()}"
