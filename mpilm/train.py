"""Train a language model data-parallel over MPI. One script for one or many processes.

    python -m mpilm.train                                  # 1 process
    mpirun -np 4 python -m mpilm.train --allreduce ring    # 4 ranks on this machine
    srun -n 64 python -m mpilm.train --config run.toml     # under Slurm
    python -m mpilm.train --help                           # every option

Each rank holds the whole model and its own block of the corpus; after every backward the
gradients (one flat buffer, ``param.grad`` views into it) are averaged with the chosen allreduce,
then every rank takes the same optimizer step. Rank 0 prints, evaluates the averaged validation
loss, and writes ``<out>/config.json``, ``metrics.jsonl``, ``summary.json`` and ``model.pt``.

This file wires the parts together; the work is done in ``data``, ``models``, ``comm``,
``optim``, ``timing`` and ``checkpoint``. Points where ranks wait for each other are marked SYNC.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI
from tqdm import tqdm

from mpilm import checkpoint, config, data, models, optim
from mpilm.comm import collectives, compress, shm, world
from mpilm.comm.grad_sync import GradBuffer, broadcast_
from mpilm.errors import UsageError
from mpilm.timing import PHASES, PhaseTimer, Tracer, format_run_metrics, format_table, run_metrics


def train_step(model, grads: GradBuffer, optimizer, get_batch, accum: int, timer: PhaseTimer, *,
               algorithm: str = "auto", grad_clip: float = 0.0, reduce_bucket=None, autocast=None) -> torch.Tensor:
    """One optimizer step over ``accum`` micro-batches; returns this rank's mean loss (a tensor).

    ``get_batch(micro)`` returns (x, y) on the model's device.
    """
    with timer.phase("optimizer"):  # zero_grad is the optimizer's bookkeeping
        grads.zero_()
        total = torch.zeros((), device=grads.params[0].device)
    for micro in range(accum):
        with timer.phase("data"):
            x, y = get_batch(micro)
        with timer.phase("forward"), (autocast or contextlib.nullcontext()):
            _, loss = model(x, y)
            loss = loss / accum  # the mean over all micro-batches, so accumulation == a bigger batch
        with timer.phase("backward"):
            loss.backward()
            total += loss.detach()
    with timer.phase("comm"):
        grads.check_views()
        # SYNC: every bucket waits for every rank's gradients
        timer.add("comm_total", grads.sync(reduce_bucket, algorithm))
    with timer.phase("optimizer"):
        grads.clip_(grad_clip)
        optimizer.step()
    return total


@torch.no_grad()
def evaluate(model, val: torch.Tensor, cfg: config.TrainConfig, comm: MPI.Comm, device, autocast=None) -> float:
    """Mean loss over fixed validation windows, shared out over the ranks. SYNC (allreduce)."""
    model.eval()
    starts = data.eval_starts(val.numel(), cfg.block_size, cfg.eval_batches * cfg.batch_size, cfg.seed)
    mine = starts[comm.Get_rank()::comm.Get_size()]
    sums = np.zeros(2)  # [sum of token losses, number of windows]
    for chunk in mine.split(cfg.batch_size):
        x, y = data.windows(val, chunk, cfg.block_size)
        with autocast or contextlib.nullcontext():
            _, loss = model(x.to(device), y.to(device))
        sums += (loss.item() * len(chunk), len(chunk))
    comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)  # SYNC
    model.train()
    return float(sums[0] / sums[1])


def mean_over_ranks(comm: MPI.Comm, values: list[float]) -> list[float]:
    """SYNC: element-wise mean of a few floats over all ranks."""
    arr = np.asarray(values, dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
    return list(arr / comm.Get_size())


def run(argv: list[str] | None = None) -> dict | None:
    comm = world.WORLD
    rank, n_ranks = comm.Get_rank(), comm.Get_size()
    cfg = config.parse(argv, quiet=rank != 0)
    device = world.pick_device(cfg.device)
    if cfg.allreduce == "shm" and world.local_size() != n_ranks:  # the same verdict on every rank
        raise UsageError(f"--allreduce shm: the job spans several nodes ({world.local_size()} of {n_ranks} ranks "
                         "on this one); shm works within one node, use --allreduce hier")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    t_load = time.perf_counter()
    corpus = data.load(comm, cfg.data, cfg.cache_dir, cfg.val_fraction, cfg.block_size, cfg.data_io)  # SYNC
    t_load = time.perf_counter() - t_load

    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, vocab_size=corpus.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_embd=cfg.n_embd, block_size=cfg.block_size, dropout=cfg.dropout).to(device)
    broadcast_([*model.parameters(), *model.buffers()], comm)  # SYNC: everyone starts from rank 0's weights
    # gradients in node shared memory when an algorithm may read peers' memory directly
    grads = GradBuffer(model.named_parameters(), cfg.bucket_mb * 2**20, comm, device,
                       shared_memory=cfg.allreduce in ("shm", "hier", "auto"))  # SYNC: map check
    # with DGC momentum correction the compressor applies the momentum: SGD must not apply it twice
    optimizer = optim.build(model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay,
                            0.0 if cfg.momentum_correction else cfg.momentum)
    tracer = Tracer(rank, cfg.trace_steps) if cfg.trace else None
    timer = PhaseTimer(device, traffic=world.traffic, tracer=tracer)
    compressor = compress.make_compressor(
        cfg.compress, topk_ratio=cfg.topk_ratio, error_feedback=cfg.error_feedback, aggregate=cfg.topk_aggregate,
        momentum_correction=cfg.momentum_correction, momentum=cfg.momentum, local_clip=cfg.local_clip,
        warmup_steps=cfg.topk_warmup_steps)  # topk builds or loads the C++ kernels here, not in step 1
    compressor.timer = timer
    out = Path(cfg.out)
    # collective on first use (auto may look at the node layout), so every rank asks
    auto_choice = collectives.describe_auto(sorted({b.nbytes for b in grads.buckets}), comm) if cfg.allreduce == "auto" else []
    uses_shm = device.type == "cpu" and (cfg.allreduce == "shm" or any(a == "shm" for _, a in auto_choice))
    shm_path = shm.implementation(comm) if uses_shm else ""  # collective: every rank asks
    node_lines = world.node_lines()  # collective: every node's placement, as set by pick_device

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "world_size": n_ranks}, indent=2) + "\n")
        block_sizes = [b.nbytes for b in grads.buckets]
        print(f"mpilm | {n_ranks} rank(s) on {len(node_lines)} node(s) | {world.library_version()}")
        for line in node_lines:
            print(line)
        print(f"model {cfg.model}: {model.num_params() / 1e6:.2f}M parameters | "
              f"{len(grads.buckets)} gradient bucket(s) of up to {max(block_sizes) / 2**20:.2f} MiB | "
              f"allreduce {cfg.allreduce}")
        if cfg.compress != "none":
            print(f"compression {compressor.describe()}")
        if auto_choice:
            print("auto allreduce per bucket size: " + ", ".join(f"{size / 2**20:.2f} MiB -> {algo}" for size, algo in auto_choice))
        if shm_path:
            print(f"shm allreduce: {shm_path}")
        print(f"data: {corpus.n_train:,} training tokens, {corpus.block.numel():,} per rank, "
              f"{corpus.val.numel():,} validation | cache {corpus.cache_path} "
              f"({'built' if corpus.built_now else 'reused'}, {t_load:.1f}s, {cfg.data_io})")
        print(f"batch: {cfg.batch_size} x {cfg.block_size} tokens x {cfg.grad_accum} accum x {n_ranks} ranks = "
              f"{cfg.tokens_per_step_per_rank * n_ranks:,} tokens/step | {cfg.steps} steps | out {out}")
    metrics = open(out / "metrics.jsonl", "w") if rank == 0 else None

    def get_batch(step):
        def batch(micro):
            x, y = data.sample_batch(corpus.block, cfg.batch_size, cfg.block_size, cfg.seed, rank, step, micro)
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return batch

    first_val = evaluate(model, corpus.val, cfg, comm, device, autocast)
    if rank == 0:
        print(f"step 0: val loss {first_val:.4f}")
    val_loss = first_val
    losses: list[torch.Tensor] = []
    bar = tqdm(total=cfg.steps, disable=rank != 0 or not sys.stderr.isatty(), leave=False, unit="step")
    if tracer is not None:
        tracer.start(comm, cfg.trace)  # SYNC: a Barrier gives every rank's trace clock the same zero
    t_run = time.perf_counter()
    for step in range(cfg.steps):
        timer.begin_step(step)
        lr = optim.lr_at(step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        optim.set_lr(optimizer, lr)
        reduce_bucket = None if cfg.compress == "none" else (
            lambda view, index, step=step: compressor.allreduce_(view, index, comm, cfg.allreduce, step))
        losses.append(train_step(model, grads, optimizer, get_batch(step), cfg.grad_accum, timer,
                                 algorithm=cfg.allreduce, grad_clip=cfg.grad_clip, reduce_bucket=reduce_bucket,
                                 autocast=autocast))
        timer.end_step()
        bar.update(1)
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.log_every == 0 or last:
            window = timer.last(min(cfg.log_every, len(timer.steps)))
            # SYNC: loss averaged over ranks, for the log line only
            loss = mean_over_ranks(comm, [torch.stack(losses[-len(window):]).mean().item()])[0]
            record = _log_record(step + 1, loss, lr, window, cfg.tokens_per_step_per_rank * n_ranks)
            if rank == 0:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.write(f"step {step + 1:>5}/{cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | "
                          f"{record['tokens_per_s']:,.0f} tok/s | comm {record['comm_share']:.0%} | "
                          f"{record['step_s'] * 1e3:.0f} ms/step")
        if (step + 1) % cfg.eval_every == 0 or last:
            val_loss = evaluate(model, corpus.val, cfg, comm, device, autocast)
            if rank == 0:
                bar.write(f"step {step + 1}: val loss {val_loss:.4f} | ppl {math.exp(val_loss):.2f} | "
                          f"{val_loss / math.log(2):.3f} bits/byte")
    bar.close()
    wall = time.perf_counter() - t_run
    if tracer is not None and tracer.finish(comm, cfg.trace):  # SYNC: gathers every rank's events to rank 0
        print(f"trace of steps 0-{min(cfg.steps, cfg.trace_steps) - 1}: {cfg.trace} (open in ui.perfetto.dev)")
    return _finish(cfg, comm, model, timer, losses, first_val, val_loss, wall, metrics, device, autocast,
                   gradient_bytes=sum(b.nbytes for b in grads.buckets))


def _log_record(step: int, loss: float, lr: float, window: list[dict], tokens_per_step: int) -> dict:
    step_s = sum(s["total"] for s in window) / len(window)
    record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_step / step_s, "step_s": step_s}
    for phase in (*PHASES, "comm_total"):
        record[f"{phase}_s"] = sum(s.get(phase, 0.0) for s in window) / len(window)
    record["comm_share"] = record["comm_s"] / step_s
    for key in ("bytes_sent", "bytes_received"):  # this rank's bytes handed to / taken from MPI
        record[key] = sum(s.get(key, 0) for s in window) / len(window)
    return record


def _finish(cfg, comm, model, timer, losses, first_val, val_loss, wall, metrics, device, autocast,
            gradient_bytes: int = 0) -> dict | None:
    rank, n_ranks = comm.Get_rank(), comm.Get_size()
    summary = timer.summary()
    tail = losses[-min(len(losses), cfg.log_every):]
    compute = sum(s.get(p, 0.0) for s in timer.steps for p in PHASES if p != "comm")
    comm_s = sum(s.get("comm", 0.0) for s in timer.steps)
    comm_total = sum(s.get("comm_total", 0.0) for s in timer.steps)
    stats = timer.rank_stats()
    # SYNC: one allreduce averages the run totals and the per-step means (time, bytes) over ranks
    final_train, compute, comm_s, comm_total, *step_means = mean_over_ranks(
        comm, [torch.stack(tail).mean().item(), compute, comm_s, comm_total, *stats.values()])
    stats = dict(zip(stats, step_means))
    perf = run_metrics(stats, world_size=n_ranks, tokens_per_step=cfg.tokens_per_step_per_rank * n_ranks,
                       flops_per_token=model.flops_per_token(), payload_bytes=gradient_bytes, device=device)
    tokens_per_s = perf["tokens_per_s"]
    result = {
        "final_train_loss": final_train,
        "initial_val_loss": first_val,
        "final_val_loss": val_loss,
        "val_perplexity": math.exp(val_loss),
        "val_bits_per_byte": val_loss / math.log(2),
        "steps": cfg.steps,
        "world_size": n_ranks,
        "compute_s": compute,
        "comm_s": comm_s,
        "comm_total_s": comm_total,
        "wall_s": wall,
        **perf,  # tokens/s, FLOP/s, MFU, bytes per step, busbw, comm/compute (timing.run_metrics)
        "phases": summary,
    }
    if cfg.sample and rank == 0:
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        prompt = torch.tensor([[ord("\n")]], device=device)
        with autocast or contextlib.nullcontext():
            text = bytes(model.generate(prompt, cfg.sample, generator=g)[0, 1:].tolist()).decode("utf-8", "replace")
        print(f"--- sample ({cfg.sample} tokens) ---\n{text}\n---")
    if rank == 0:
        metrics.close()
        out = Path(cfg.out)
        (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        checkpoint.save(out / "model.pt", {"model": model.state_dict(), "config": cfg.to_dict(), "step": cfg.steps})
        print(format_table(summary))
        print(format_run_metrics(perf))
        print(f"done: val loss {first_val:.4f} -> {val_loss:.4f} ({val_loss / math.log(2):.3f} bits/byte) | "
              f"{tokens_per_s:,.0f} tok/s | compute {compute:.1f}s, comm {comm_s:.1f}s "
              f"({comm_s / (compute + comm_s):.0%}) | {wall:.0f}s | {cfg.out}")
    return result


def main(argv: list[str] | None = None) -> int:
    return world.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
