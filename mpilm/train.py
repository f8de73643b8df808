"""Train a language model data-parallel over MPI. One script for one or many processes.

    python -m mpilm.train                                  # 1 process
    mpirun -np 4 python -m mpilm.train --allreduce ring    # 4 ranks on this machine
    srun --mpi=pmi2 -n 64 python -m mpilm.train --config run.toml   # under Slurm (plain srun -n is refused)
    python -m mpilm.train --help                           # every option

Each rank holds the whole model and its own block of the corpus; during backward the gradients
(one flat buffer, ``param.grad`` views into it) are averaged bucket by bucket with the chosen
allreduce on a communication thread, then every rank takes the same optimizer step. Rank 0 prints, evaluates the averaged validation
loss, and writes ``<out>/config.json``, ``metrics.jsonl``, ``summary.json`` and ``model.pt``.

This file is a short loop over a ``Run`` (``mpilm/run.py``) plus what a user sees: the banner,
the log lines, the evaluations, the summary and the output files. Points where ranks wait for each other are marked SYNC.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI
from tqdm import tqdm

import mpilm
from mpilm import checkpoint, config, optim
from mpilm.errors import UsageError
from mpilm.comm import collectives, shm, world
from mpilm.metrics import format_run_metrics, run_metrics
from mpilm.run import Run, build
from mpilm.timing import PHASES, format_table


def mean_over_ranks(comm: MPI.Comm, values: list[float]) -> list[float]:
    """SYNC: element-wise mean of a few floats over all ranks."""
    arr = np.asarray(values, dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
    return list(arr / comm.Get_size())


PREEMPTED_EXIT = 75  # exit status after a pre-emption checkpoint (EX_TEMPFAIL: "try again", with --resume auto)


class Preemption:
    """SIGTERM / SIGUSR1 (Slurm's pre-emption and ``--signal=USR1@T``): finish the step, checkpoint, exit.

    The first signal only sets a flag; after every step the ranks agree on it (SYNC: one small
    allreduce, so ranks signalled a step apart still stop at the same step boundary). A second
    signal exits at once. The previous handlers come back when the run ends.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)  # the second signal: no checkpoint, now
        self.received = signum

    def agreed(self, comm: MPI.Comm) -> bool:
        return bool(comm.allreduce(self.received is not None, op=MPI.LOR))  # SYNC: did any rank get one?

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def run(argv: list[str] | None = None) -> dict | None:
    comm = world.WORLD
    rank, n_ranks = comm.Get_rank(), comm.Get_size()
    # the default --out is named by rank 0's clock, so every rank writes to the same run directory
    stamp = comm.bcast(time.strftime("%Y%m%d-%H%M%S") if rank == 0 else None, root=0)
    cfg = config.parse(argv, quiet=rank != 0, run_name=stamp)
    unwritable = checkpoint.first_problem(comm, _write_problem(cfg, rank))  # SYNC: before any work, one verdict
    if unwritable:
        raise UsageError(unwritable)
    t_load = time.perf_counter()
    job = build(cfg, comm)  # SYNC: corpus, model broadcast, bucket map check
    t_load = time.perf_counter() - t_load
    preemption = Preemption()
    try:
        return _train(job, t_load, preemption)
    finally:
        preemption.restore()
        job.close()


def resume_point(cfg: config.TrainConfig, comm: MPI.Comm) -> Path | None:
    """The checkpoint ``--resume`` names, verified on every rank (SYNC), or None to start afresh.

    ``auto``: the newest complete checkpoint that every rank verifies; a corrupt one is skipped
    with a warning. A named directory that fails verification is a usage error.
    """
    if cfg.resume is None:
        return None
    rank = comm.Get_rank()
    if cfg.resume != "auto":
        path = Path(cfg.resume).expanduser()
        bad = checkpoint.first_problem(comm, checkpoint.verify(path, rank) if path.is_dir() else f"{path}: no such checkpoint directory")
        if bad:
            raise UsageError(f"--resume {cfg.resume}: {bad}")
        return path
    candidates = checkpoint.complete_checkpoints(ckpt_dir(cfg)) if rank == 0 else None
    for path in reversed(comm.bcast(candidates, root=0)):  # the same list on every rank: rank 0's view
        bad = checkpoint.first_problem(comm, checkpoint.verify(path, rank))
        if bad is None:
            return path
        if rank == 0:
            print(f"warning: --resume auto: {bad}; trying the previous checkpoint", file=sys.stderr, flush=True)
    return None


def ckpt_dir(cfg: config.TrainConfig) -> Path:
    return Path(cfg.ckpt_dir).expanduser() if cfg.ckpt_dir else Path(cfg.out) / "ckpt"


def _write_problem(cfg: config.TrainConfig, rank: int) -> str | None:
    """Why this rank could not write where it will (rank 0: --out; every rank: its checkpoint file), or None."""
    return ((checkpoint.writable_problem(cfg.out, "--out") if rank == 0 else None)
            or (checkpoint.writable_problem(ckpt_dir(cfg), "--ckpt-dir") if cfg.ckpt_every else None))


def _train(job: Run, t_build: float, preemption: Preemption) -> dict | None:
    cfg, comm, grads = job.cfg, job.comm, job.grads
    rank, n_ranks = comm.Get_rank(), comm.Get_size()
    out = Path(cfg.out)
    resumed_from = resume_point(cfg, comm)  # SYNC: every rank verifies its own file
    if resumed_from is not None:
        state, meta = checkpoint.load_rank(resumed_from, rank)
        if differ := checkpoint.config_mismatch(meta["config"], cfg.to_dict()):  # same on every rank: one meta.json
            raise UsageError(f"--resume {resumed_from}: written with other options: {'; '.join(differ)}; resume with "
                             "the options it was written with")
        try:
            job.load_state_dict(state)  # before anything else reads the model
        except UsageError as err:  # the same verdict on every rank: it depends only on the config and the checkpoint
            raise UsageError(f"--resume {resumed_from}: {err}") from None
    writer = checkpoint.Writer(ckpt_dir(cfg), comm, cfg.keep_ckpts) if cfg.ckpt_every else None
    # collective on first use (auto may look at the node layout), so every rank asks
    sizes = sorted({b.nbytes for b in grads.buckets})
    auto_choice = collectives.describe_auto(sizes, job.grad_comm) if cfg.allreduce == "auto" else []
    runs = collectives.algorithm_that_runs(cfg.allreduce, job.device, job.grad_comm)
    uses_shm = job.device.type == "cpu" and (cfg.allreduce in ("shm", "hier") or any(a in ("shm", "hier") for _, a in auto_choice))
    shm_path = shm.implementation(job.grad_comm) if uses_shm else ""  # collective: every rank asks
    node_lines = world.node_lines()  # collective: every node's placement, as set by pick_device

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "world_size": n_ranks, "nodes": len(node_lines)}, indent=2) + "\n")
        print(f"mpilm | {n_ranks} rank(s) on {len(node_lines)} node(s) | {world.mpi_description()}")
        for line in node_lines:
            print(line)
        print(f"model {cfg.model}: {job.model.num_params() / 1e6:.2f}M parameters | "
              f"{len(grads.buckets)} gradient bucket(s) of up to {max(sizes) / 2**20:.2f} MiB | "
              f"allreduce {runs} | overlap {job.overlap_reason}"
              f"{' | ZeRO-1' if cfg.zero else ''}")
        if grads.overlap:
            print(f"communication thread: {grads.priority}; waits by polling every {cfg.comm_poll_us:g} us"
                  if cfg.comm_poll_us > 0 else f"communication thread: {grads.priority}; MPI's busy wait")
        if job.reducer is not None and cfg.compress != "none":
            print(f"compression {job.reducer.describe()}")
        if job.mode is not None:
            print(job.mode.describe())
        if auto_choice:
            print("auto allreduce per bucket size: " + ", ".join(f"{size / 2**20:.2f} MiB -> {algo}" for size, algo in auto_choice))
        if shm_path:
            print(f"shm allreduce: {shm_path}")
        corpus = job.corpus
        print(f"data: {corpus.n_train:,} training tokens, {corpus.block.numel():,} per rank, "
              f"{corpus.val.numel():,} validation | cache {corpus.cache_path} "
              f"({'built' if corpus.built_now else 'reused'}, {t_build:.1f}s to load and build, {cfg.data_io})")
        if cfg.sync == "async":
            print(f"batch: {cfg.batch_size} x {cfg.block_size} tokens x {cfg.grad_accum} accum per gradient | "
                  f"{cfg.steps} gradients in all ({cfg.steps * cfg.tokens_per_step_per_rank:,} tokens) from "
                  f"{n_ranks - cfg.ps_ranks} worker(s), whichever sends first, applied one by one by "
                  f"{'rank 0' if cfg.ps_ranks == 1 else f'ranks 0-{cfg.ps_ranks - 1}, each to its slice'} | out {out}")
        else:
            print(f"batch: {cfg.batch_size} x {cfg.block_size} tokens x {cfg.grad_accum} accum x {n_ranks} ranks = "
                  f"{cfg.tokens_per_step_per_rank * n_ranks:,} tokens/step | {cfg.steps} steps | out {out}")
        if resumed_from is not None:
            print(f"resumed from {resumed_from} at step {job.step_index}")
            if meta["world_size"] != n_ranks:
                print(f"notice: the checkpoint was written by {meta['world_size']} rank(s), this job has {n_ranks}: "
                      "every rank's block of the corpus moves, so the data order from here on differs from a run "
                      f"that stayed at {meta['world_size']} (the model and optimizer continue unchanged)")
        elif cfg.resume == "auto":
            print(f"--resume auto: no complete checkpoint in {ckpt_dir(cfg)}: starting at step 0")
        if writer is not None:
            print(f"checkpoints every {cfg.ckpt_every} steps to {ckpt_dir(cfg)} (keeping {cfg.keep_ckpts or 'all'}), "
                  "written in the background")
    # a resumed run continues its metrics file (the lines after the checkpoint's step are dropped)
    metrics = _open_metrics(out / "metrics.jsonl", job.step_index) if rank == 0 else None

    first_val = job.evaluate()
    if rank == 0:
        print(f"step {job.step_index}: val loss {first_val:.4f}")
    val_loss = first_val
    timer, tracer = job.timer, job.tracer
    bar = tqdm(total=cfg.steps, disable=rank != 0 or not sys.stderr.isatty(), leave=False, unit="step")
    if tracer is not None:
        tracer.start(comm, cfg.trace)  # SYNC: a Barrier gives every rank's trace clock the same zero
    t_run = time.perf_counter()
    if cfg.sync == "async":
        writer, val_loss = _train_async(job, writer, preemption, metrics, bar), None
    while cfg.sync != "async" and job.step_index < cfg.steps:
        job.step()
        step = job.step_index
        if writer is not None:
            with job.watched(f"the checkpoint writers' agreement after step {step}"):
                if step % cfg.ckpt_every == 0:
                    writer.begin(step, job.state_dict(), _ckpt_meta(cfg, n_ranks, step))  # SYNC: a Barrier
                else:
                    writer.poll()  # SYNC while a checkpoint is being written: is every rank done?
        with job.watched(f"the pre-emption vote after step {step}"):
            preempted = step < cfg.steps and preemption.agreed(comm)  # SYNC: did a signal reach some rank?
        if preempted:
            writer = writer or checkpoint.Writer(ckpt_dir(cfg), comm, cfg.keep_ckpts)
            if not writer.written or writer.written[-1].name != f"step-{step}":
                writer.begin(step, job.state_dict(), _ckpt_meta(cfg, n_ranks, step))
            with job.watched(f"the pre-emption checkpoint of step {step}"):
                path = writer.finish() or writer.written[-1]  # SYNC: complete before anyone exits
            _exit_preempted(rank, metrics, step, path)
        bar.update(1)
        last = step == cfg.steps
        if step % cfg.log_every == 0 or last:
            window = timer.last(min(cfg.log_every, len(timer.steps)))
            lr = optim.lr_at(step - 1, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
            with job.watched(f"the log line's loss average after step {step}"):  # SYNC: for the log line only
                loss = mean_over_ranks(comm, [torch.stack(job.losses[-len(window):]).mean().item()])[0]
            record = _log_record(step, loss, lr, window, cfg.tokens_per_step_per_rank * n_ranks)
            record["skipped_steps"] = job.skipped_steps  # so far: non-finite updates left out
            with job.watched(f"the metrics line's write verdict after step {step}"), \
                    checkpoint.agreed_writes(comm, out / "metrics.jsonl"):  # SYNC: did rank 0's write work?
                if rank == 0:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
            if rank == 0:
                bar.write(f"step {step:>5}/{cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | "
                          f"{record['tokens_per_s']:,.0f} tok/s | comm {record['comm_share']:.0%} exposed "
                          f"of {record['comm_total_s'] * 1e3:.0f} ms | {record['step_s'] * 1e3:.0f} ms/step")
        if step % cfg.eval_every == 0 or last:
            val_loss = job.evaluate()
            if rank == 0:
                bar.write(f"step {step}: val loss {val_loss:.4f} | ppl {math.exp(val_loss):.2f} | "
                          f"{val_loss / math.log(2):.3f} bits/byte")
    bar.close()
    if val_loss is None:  # async: the server's model, now on every rank
        val_loss = job.evaluate()
        if rank == 0:
            print(f"step {job.step_index}: val loss {val_loss:.4f} | ppl {math.exp(val_loss):.2f}")
    if writer is not None:
        with job.watched("the last checkpoint's completion"):
            writer.finish()  # SYNC: the last checkpoint is complete before the run reports
        if rank == 0 and writer.stalls:
            print(f"checkpoints: {len(writer.written)} written, the loop stalled {1e3 * max(writer.stalls):.0f} ms "
                  f"at most ({1e3 * sum(writer.stalls) / len(writer.stalls):.0f} ms mean) per checkpoint; "
                  f"newest {writer.written[-1]}")
    wall = time.perf_counter() - t_run
    with job.watched("the trace's gather"):
        traced = tracer is not None and tracer.finish(comm, cfg.trace)  # SYNC: every rank's events to rank 0
    if traced:
        print(f"trace of steps 0-{min(cfg.steps, cfg.trace_steps) - 1}: {cfg.trace} (open in ui.perfetto.dev)")
    return _finish(job, first_val, val_loss, wall, metrics)


def _exit_preempted(rank: int, metrics, step: int, path: Path) -> None:
    if rank == 0:
        metrics.close()
        print(f"pre-empted by a signal at step {step}: checkpoint {path}; continue with the same command "
              f"and --resume auto (exit status {PREEMPTED_EXIT})", file=sys.stderr, flush=True)
    raise SystemExit(PREEMPTED_EXIT)


def _train_async(job: Run, writer, preemption: Preemption, metrics, bar):
    """--sync async: the parameter server's loop (mpilm/modes/async_ps.py) with this file's
    checkpoints, pre-emption and log lines; returns the checkpoint writer (or None)."""
    cfg, comm = job.cfg, job.comm
    rank, n_ranks = comm.Get_rank(), comm.Get_size()

    def checkpoint_now(version: int) -> None:  # SYNC: every rank, at a pause of the server's loop
        nonlocal writer
        version = comm.bcast(version, root=0)  # the server's count names the checkpoint on every rank
        writer = writer or checkpoint.Writer(ckpt_dir(cfg), comm, cfg.keep_ckpts)
        with job.watched(f"the checkpoint at server update {version}"):
            writer.begin(version, job.state_dict(), _ckpt_meta(cfg, n_ranks, version))
            writer.finish()  # SYNC: complete before the workers go on (nothing moves meanwhile)

    def log(record: dict) -> None:  # the server's progress, rank 0 only
        with checkpoint.agreed_writes(comm, Path(cfg.out) / "metrics.jsonl", collective=False):
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        bar.update(0)
        val = f" | val loss {record['val_loss']:.4f}" if "val_loss" in record else ""
        bar.write(f"update {record['step']:>6} | loss {record['loss']:.4f} | staleness {record['staleness_mean']:.1f} "
                  f"| {record['dropped']} dropped | {record['updates_per_s']:.1f} updates/s{val}")

    outcome = job.mode.train(job, checkpoint_every=cfg.ckpt_every, checkpoint=checkpoint_now,
                             signalled=lambda: preemption.received is not None, log=log,
                             evaluate_every=cfg.eval_every, log_every=cfg.log_every)
    if outcome == "preempted":
        _exit_preempted(rank, metrics, job.mode.version, writer.written[-1])
    return writer


def _open_metrics(path: Path, resumed_step: int):
    """metrics.jsonl for appending: fresh at step 0, else the lines up to ``resumed_step`` kept."""
    if resumed_step == 0 or not path.is_file():
        return open(path, "w")
    # a line cut short (the disk filled mid-write) lacks its closing brace and is dropped
    kept = [line for line in path.read_text().splitlines() if line.endswith("}") and json.loads(line)["step"] <= resumed_step]
    path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")


def _ckpt_meta(cfg: config.TrainConfig, n_ranks: int, step: int) -> dict:
    return {"step": step, "world_size": n_ranks, "config": cfg.to_dict(), "mpilm": mpilm.__version__,
            "torch": torch.__version__}


def _log_record(step: int, loss: float, lr: float, window: list[dict], tokens_per_step: int) -> dict:
    step_s = sum(s["total"] for s in window) / len(window)
    record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_step / step_s, "step_s": step_s}
    for phase in (*PHASES, "comm_total"):
        record[f"{phase}_s"] = sum(s.get(phase, 0.0) for s in window) / len(window)
    record["comm_share"] = record["comm_s"] / step_s
    for key in ("bytes_sent", "bytes_received"):  # this rank's bytes handed to / taken from MPI
        record[key] = sum(s.get(key, 0) for s in window) / len(window)
    return record


def _finish(job: Run, first_val: float, val_loss: float, wall: float, metrics) -> dict | None:
    cfg, comm, timer, model = job.cfg, job.comm, job.timer, job.model
    rank, n_ranks = comm.Get_rank(), comm.Get_size()
    summary = timer.summary()
    tail = job.losses[-min(len(job.losses), cfg.log_every):]
    compute = sum(s.get(p, 0.0) for s in timer.steps for p in PHASES if p != "comm")
    comm_s = sum(s.get("comm", 0.0) for s in timer.steps)
    comm_total = sum(s.get("comm_total", 0.0) for s in timer.steps)
    stats = timer.rank_stats()
    buckets = job.buckets
    per_bucket = [*buckets.total_s, *buckets.exposed_s] if buckets is not None and buckets.steps else []
    state_bytes = job.optimizer_state_bytes()
    # SYNC: one allreduce averages the run totals, the per-step means (time, bytes) and the
    # per-bucket times over ranks
    with job.watched("the summary's averages over ranks"):
        final_train, compute, comm_s, comm_total, state_mean, *means = mean_over_ranks(
            comm, [torch.stack(tail).mean().item() if tail else float("nan"), compute, comm_s, comm_total, state_bytes,
                   *stats.values(), *per_bucket])
    stats = dict(zip(stats, means[:len(stats)]))
    per_bucket = means[len(stats):]
    gradient_bytes = sum(b.nbytes for b in job.grads.buckets)
    perf = run_metrics(stats, world_size=n_ranks, tokens_per_step=cfg.tokens_per_step_per_rank * n_ranks,
                       flops_per_token=model.flops_per_token(), payload_bytes=gradient_bytes, device=job.device)
    full_state = state_bytes * job.grads.numel / max(1, job.optimizer.numel) if cfg.zero else state_bytes
    bucket_rows = []
    if per_bucket:
        n = len(job.grads.buckets)
        bucket_rows = [{"bucket": b.index, "bytes": b.nbytes, "comm_total_s": per_bucket[i] / buckets.steps,
                        "exposed_s": per_bucket[n + i] / buckets.steps} for i, b in enumerate(job.grads.buckets)]
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
        "skipped_steps": job.skipped_steps,
        "sync": cfg.sync,
        "overlap": job.grads.overlap,
        "zero": cfg.zero,
        "optimizer_state_bytes_per_rank": state_mean,
        "optimizer_state_bytes_unsharded": full_state,
        "wall_s": wall,
        **perf,  # tokens/s, FLOP/s, MFU, bytes per step, busbw, comm/compute (metrics.run_metrics)
        "buckets": bucket_rows,
        "phases": summary,
    }
    if cfg.sync == "async":
        with job.watched("the server's summary"):
            result.update(comm.bcast(job.mode.summary(), root=0))  # SYNC: the server's figures, on every rank
        # every gradient the server took (applied or dropped) is one worker's batch
        result["tokens_per_s"] = perf["tokens_per_s"] = (
            result["gradients_this_run"] * cfg.tokens_per_step_per_rank / max(1e-9, result["async_wall_s"]))
    if cfg.sample and rank == 0:
        g = torch.Generator(device=job.device).manual_seed(cfg.seed)
        prompt = torch.tensor([[ord("\n")]], device=job.device)
        with job.autocast or contextlib.nullcontext():
            text = bytes(model.generate(prompt, cfg.sample, generator=g)[0, 1:].tolist()).decode("utf-8", "replace")
        print(f"--- sample ({cfg.sample} tokens) ---\n{text}\n---")
    out = Path(cfg.out)
    with job.watched("the summary's write verdict"), \
            checkpoint.agreed_writes(comm, out / "summary.json"):  # SYNC: did rank 0's write work?
        if rank == 0:
            metrics.close()
            (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    with job.watched("the final model's write verdict"), \
            checkpoint.agreed_writes(comm, out / "model.pt"):  # SYNC: did rank 0's write work?
        if rank == 0:
            checkpoint.save(out / "model.pt", {"model": model.state_dict(), "config": cfg.to_dict(), "step": cfg.steps})
    if rank == 0:
        print(format_table(summary))
        print(format_run_metrics(perf))
        if bucket_rows:
            shown = sorted(bucket_rows, key=lambda r: -r["exposed_s"])[:6]  # the ones the step waited on most
            more = f" (and {len(bucket_rows) - len(shown)} more, in summary.json)" if len(bucket_rows) > len(shown) else ""
            print(f"buckets, ms per step (total / exposed, mean over ranks), most exposed first: " + ", ".join(
                f"b{r['bucket']} {r['bytes'] / 2**20:.2f} MiB {r['comm_total_s'] * 1e3:.1f}/"
                f"{r['exposed_s'] * 1e3:.1f}" for r in shown) + more)
        if n_ranks > 1 and cfg.sync == "sync":
            print(f"overlap: {'on' if job.grads.overlap else 'off'} | comm {perf['comm_total_s_per_step'] * 1e3:.1f} ms "
                  f"per step, {perf['comm_s_per_step'] * 1e3:.1f} ms exposed ({perf['comm_hidden_share'] or 0.0:.0%} hidden)")
        sharded = (f"ZeRO-1 over {n_ranks} ranks; unsharded it would be {_mib(full_state)}" if cfg.zero
                   else "not sharded (--zero 1 would divide it by the ranks)")
        if cfg.sync == "async":  # the servers hold it, each for its slice
            print(f"optimizer state: {_mib(state_mean * n_ranks / cfg.ps_ranks)} per server on {cfg.ps_ranks} "
                  f"server(s) (--ps-ranks); the workers hold none")
        else:
            print(f"optimizer state: {_mib(state_mean)} per rank ({sharded})")
        if cfg.sync == "async":
            busy = result["server_busy_share"]
            servers = result["ps_ranks"]
            print(f"async: {result['updates']} updates from {n_ranks - servers} worker(s) to {servers} server(s) "
                  f"| staleness mean {result['staleness_mean']:.2f}, histogram {result['staleness_histogram']} | "
                  f"{result['dropped_gradients']} dropped | server busy {busy:.0%}"
                  + (f" of the busiest" if servers > 1 else "")
                  + (f" (the servers are the bottleneck: workers wait for them; try --ps-ranks {servers + 1})"
                     if busy > 0.9 else ""))
        print(f"done: val loss {first_val:.4f} -> {val_loss:.4f} ({val_loss / math.log(2):.3f} bits/byte) | "
              f"{perf['tokens_per_s']:,.0f} tok/s | compute {compute:.1f}s, comm {comm_s:.1f}s exposed of "
              f"{comm_total:.1f}s ({comm_s / (compute + comm_s):.0%}) | {wall:.0f}s | {cfg.out}")
    return result


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    return world.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
