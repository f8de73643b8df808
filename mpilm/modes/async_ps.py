"""Asynchronous SGD with a parameter server (``--sync async``): workers never wait for each other.

Does: rank 0 is the server; it holds the master parameters (its model) and the optimizer. Every
other rank is a worker: it computes a gradient on its own block with the parameters it last
received, sends it (a small header, then each flat gradient buffer: zero-copy ``Send`` of the
buffers the hooks fill) and waits for fresh parameters, which land directly in its flat parameter
buffer. The server takes gradients in arrival order (one posted header receive per worker, no
barrier), applies each one (clip, optimizer step at the schedule's learning rate) and answers that
worker alone. ``--steps`` is the token budget of the whole run: the server takes that many
gradients in all, one batch each, from whichever workers send them, so a fast worker contributes
more than a slow one and nobody waits for the straggler to finish a quota of its own. A gradient's staleness is the number of updates the server applied
since the parameters it was computed with; with ``max_staleness`` >= 0 staler ones are dropped
(counted, never applied: a stale update is not merely smaller, it points the wrong way), and
``staleness_lr`` divides the learning rate by the staleness (Zhang et al. 2016, arXiv
1511.05950). Every gradient's staleness goes into a histogram.

Points in time where all ranks meet: checkpoints and pre-emption. When the server decides to
pause (every ``checkpoint_every`` updates, or a signal on any rank: workers report theirs in the
header) it answers each worker's next gradient with PAUSE; once every worker has its answer no
message is in flight, and all ranks run the caller's collective ``checkpoint``; the server then
re-posts its receives. Once the budget is taken, each worker's next gradient (computed meanwhile)
is answered STOP and not applied (counted as past the budget), and the server's parameters are
broadcast so every rank ends with the server's model.

The server waits by polling (``Testany``, then a sleep of 50 us doubling to 1 ms), not with
``Waitany``: MPICH's blocking wait spins a core, and a server that shares a node with workers (or a
small machine) would take that core from their forward and backward. The cost is at most 1 ms of
latency after an idle spell, against steps of tens of milliseconds or more.

Why two-sided messages and not MPI one-sided RMA: measured with ``tools/ps_transport.py`` (push
9.5 MiB, pull 9.5 MiB), Send/Recv took 3.1 ms against 7.9 ms for Put/Get under a passive-target
lock on one node (MPICH 5, shared memory), and 148 vs 149 ms across a 1 Gbit/s emulated link; and
RMA would still need a flag the server polls to learn that a gradient arrived, which testing the
posted receives gives for free.

Does not: shard the parameters over several servers (one server, rank 0: several would have to
agree on every pause among themselves); overlap a worker's send with its next backward; bound a
worker's lead over the others (the staleness rule does); pause once the budget is taken: a
checkpoint or a signal due then lets the run end.

Limits: needs 2+ ranks. The order in which gradients arrive is not deterministic with 2+ workers,
so only a one-worker run is bit-reproducible (and resumes bit-exactly). ``--steps`` counts the
gradients the server takes (one worker's batch each; sync's S steps at N ranks are N x S of them),
and the learning-rate schedule, warm-up included, runs over them: each applies one worker's gradient
at the schedule's rate. At the end up to one gradient per worker was computed past the budget.
"""

from __future__ import annotations

import collections
import time

import numpy as np
import torch
from mpi4py import MPI

from mpilm import optim
from mpilm.comm import world

SERVER = 0
HEADER_TAG, GRADIENT_TAG, ANSWER_TAG, PARAMETER_TAG = 31_001, 31_002, 31_003, 31_004
CONTINUE, PAUSE, PAUSE_AND_STOP, STOP = 0, 1, 2, 3
HEADER_FIELDS = 3  # a gradient's header: the parameters' version, the worker's signal flag, its loss


class AsyncSGD:
    name = "async"

    def __init__(self, grads, comm: MPI.Comm, max_staleness: int, staleness_lr: bool):
        self.grads, self.comm = grads, comm
        self.max_staleness, self.staleness_lr = max_staleness, staleness_lr
        self.version = 0  # server: updates applied; worker: the version of the parameters it holds
        self.dropped = 0
        self.past_budget = 0  # server: gradients that arrived after the budget was taken (not applied)
        self.per_worker: collections.Counter = collections.Counter()  # worker rank -> gradients taken from it
        self.staleness: collections.Counter = collections.Counter()  # staleness -> gradients seen (server)
        self.busy_s = 0.0  # server: seconds applying gradients and answering
        self.idle_s = 0.0  # server: seconds waiting for the next gradient

    def describe(self) -> str:
        workers = self.comm.Get_size() - 1
        rule = ("none dropped" if self.max_staleness < 0 else f"staler than {self.max_staleness} dropped")
        return (f"async SGD: rank {SERVER} is the parameter server, {workers} worker(s) push gradients and pull "
                f"parameters without waiting for each other ({rule}"
                f"{', lr / staleness' if self.staleness_lr else ''})")

    def after_step(self, step: int, timer) -> None:  # the Run's own step loop is not used in this mode
        raise RuntimeError("--sync async runs AsyncSGD.train, not Run.step")

    # ---------------------------------------------------------------- the loop
    def train(self, run, *, checkpoint_every: int, checkpoint, signalled, log=None, evaluate_every: int = 0,
              log_every: int = 1) -> str:
        """Run until the server has taken ``--steps`` gradients in all; ``"done"`` or ``"preempted"``.

        ``checkpoint(version)``: collective, called on every rank at a pause. ``signalled()``: this
        rank got a pre-emption signal. ``log(record)``: the server's progress (every ``log_every``
        updates; with ``val_loss`` every ``evaluate_every``).
        """
        is_server = self.comm.Get_rank() == SERVER
        # SYNC (start-up): what is left of the budget, by the server's count (a resumed run may have none)
        left = self.comm.bcast(run.cfg.steps - self.taken if is_server else None, root=SERVER)
        self.seen_at_start = self.taken
        self.wall_start = time.perf_counter()
        if left <= 0:
            self._final_parameters()
            return "done"
        if is_server:
            return self._serve(run, checkpoint_every, checkpoint, signalled, log, evaluate_every, log_every)
        return self._work(run, checkpoint, signalled)

    @property
    def taken(self) -> int:
        """Server: gradients taken against the budget (applied, dropped as stale, or skipped as non-finite)."""
        return sum(self.staleness.values())

    def _work(self, run, checkpoint, signalled) -> str:
        timer, comm = run.timer, self.comm
        header, answer = np.zeros(HEADER_FIELDS), np.zeros(2, dtype=np.int64)
        while True:  # until the server answers STOP (its budget is taken) or a pause that ends the run
            step = run.step_index
            timer.begin_step(step)
            loss = run.compute_gradients(step)
            header[:] = (self.version, 1.0 if signalled() else 0.0, float(loss))  # one device sync on CUDA
            t0 = time.perf_counter()
            with timer.phase("comm"), run.watched(f"the parameter server's answer to gradient {step}"):
                comm.Send(header, dest=SERVER, tag=HEADER_TAG)
                for flat in self.grads.flat.values():
                    _send(comm, flat, SERVER, GRADIENT_TAG)  # blocks until the server takes it
                comm.Recv(answer, source=SERVER, tag=ANSWER_TAG)  # SYNC: blocks on the server only
                for flat in self.grads.flat_params.values():
                    _recv(comm, flat, SERVER, PARAMETER_TAG)  # the fresh parameters, into the model's buffer
            timer.add("comm_total", time.perf_counter() - t0)
            timer.end_step()
            run.losses.append(loss)
            run.step_index += 1
            self.version, command = int(answer[0]), int(answer[1])
            if command in (PAUSE, PAUSE_AND_STOP):
                checkpoint(self.version)  # SYNC: every rank, at a point where no message is in flight
                if command == PAUSE_AND_STOP:
                    return "preempted"
            elif command == STOP:
                break
        self._final_parameters()
        return "done"

    def _serve(self, run, checkpoint_every, checkpoint, signalled, log, evaluate_every, log_every) -> str:
        cfg, timer, comm = run.cfg, run.timer, self.comm
        budget = cfg.steps
        headers = {w: np.zeros(HEADER_FIELDS) for w in range(1, comm.Get_size())}
        receives = {w: comm.Irecv(headers[w], source=w, tag=HEADER_TAG) for w in headers}
        answer = np.zeros(2, dtype=np.int64)
        pausing, paused, stopping = False, set(), False
        window_losses, window_staleness, t_window = [], [], time.perf_counter()
        next_checkpoint = (self.version // checkpoint_every + 1) * checkpoint_every if checkpoint_every else None
        while receives:
            timer.begin_step(self.version)
            t0 = time.perf_counter()
            order = list(receives)
            with timer.phase("comm"), run.watched(f"a gradient from any of workers {world.compact_cores(order)}"):
                index = _wait_any([receives[w] for w in order])  # SYNC: blocks on whichever worker is first
            worker = order[index]
            del receives[worker]
            version_used, their_signal, loss = headers[worker]
            with timer.phase("comm"):
                for flat in self.grads.flat.values():
                    _recv(comm, flat, worker, GRADIENT_TAG)  # the gradient lands where param.grad points
            t_busy = time.perf_counter()
            self.idle_s += t_busy - t0
            staleness = self.version - int(version_used)
            if self.taken >= budget:  # computed while the last gradients of the budget were taken
                self.past_budget += 1
            else:
                index = self.taken  # this gradient's place in the budget and in the lr schedule
                self.staleness[staleness] += 1
                self.per_worker[worker] += 1
                if 0 <= self.max_staleness < staleness:
                    self.dropped += 1
                else:
                    lr = optim.lr_at(index, cfg.lr, budget, cfg.warmup_steps, cfg.min_lr_ratio)
                    if run.apply_gradients(lr / max(1, staleness) if self.staleness_lr else lr):
                        self.version += 1
                        run.step_index = self.version  # the server's model is this many updates old
                        window_losses.append(loss)
                        run.losses.append(torch.tensor(loss))  # the workers' losses, as the server saw them
                        window_staleness.append(staleness)
                    else:
                        run.skipped_steps += 1
            # a pause needs every worker; once the budget is taken they are being stopped, and a
            # late signal or checkpoint lets the run finish instead
            open_budget = self.taken < budget
            if (signalled() or their_signal) and open_budget:
                pausing = stopping = True
            if next_checkpoint is not None and self.version >= next_checkpoint and open_budget and not pausing:
                pausing = True
            if pausing:
                command = PAUSE_AND_STOP if stopping else PAUSE
                paused.add(worker)
            else:
                command = CONTINUE if open_budget else STOP
            answer[:] = (self.version, command)
            with timer.phase("comm"):
                comm.Send(answer, dest=worker, tag=ANSWER_TAG)
                for flat in self.grads.flat_params.values():
                    _send(comm, flat, worker, PARAMETER_TAG)
            if command == CONTINUE:
                receives[worker] = comm.Irecv(headers[worker], source=worker, tag=HEADER_TAG)
            self.busy_s += time.perf_counter() - t_busy
            timer.end_step()
            if log is not None and window_losses and (self.version % log_every == 0 or not receives and not paused):
                record = {"step": self.version, "loss": float(np.mean(window_losses)),
                          "staleness_mean": float(np.mean(window_staleness)), "dropped": self.dropped,
                          "updates_per_s": len(window_losses) / max(1e-9, time.perf_counter() - t_window)}
                if evaluate_every and self.version % evaluate_every == 0:
                    record["val_loss"] = run.evaluate(alone=True)
                log(record)
                window_losses, window_staleness, t_window = [], [], time.perf_counter()
            if paused and not receives:
                checkpoint(self.version)  # SYNC: every worker holds its answer; nothing is in flight
                if stopping:
                    return "preempted"
                receives = {w: comm.Irecv(headers[w], source=w, tag=HEADER_TAG) for w in paused}
                paused, pausing = set(), False
                next_checkpoint = (self.version // checkpoint_every + 1) * checkpoint_every
        self._final_parameters()
        return "done"

    def _final_parameters(self) -> None:
        """SYNC: every rank ends with the server's parameters."""
        for flat in self.grads.flat_params.values():
            staged = flat.cpu() if flat.is_cuda and not world.cuda_aware() else flat
            self.comm.Bcast(world.buf(staged), root=SERVER)
            if staged is not flat:
                flat.copy_(staged)

    def summary(self) -> dict:
        """The server's figures (meaningful on rank 0): updates, dropped, staleness histogram, busy share."""
        seen = self.taken
        return {"updates": self.version, "dropped_gradients": self.dropped,
                "gradients_this_run": seen - getattr(self, "seen_at_start", 0),
                "gradients_past_budget": self.past_budget,
                "gradients_per_worker": {str(k): v for k, v in sorted(self.per_worker.items())},
                "async_wall_s": time.perf_counter() - getattr(self, "wall_start", time.perf_counter()),
                "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
                "staleness_mean": sum(k * v for k, v in self.staleness.items()) / seen if seen else 0.0,
                "server_busy_share": self.busy_s / max(1e-9, self.busy_s + self.idle_s)}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"version": self.version, "dropped": self.dropped, "staleness": dict(self.staleness),
                "past_budget": self.past_budget,
                "per_worker": dict(self.per_worker), "busy_s": self.busy_s, "idle_s": self.idle_s}

    def load_state_dict(self, state: dict) -> None:
        self.version, self.dropped = int(state["version"]), int(state["dropped"])
        self.staleness = collections.Counter({int(k): int(v) for k, v in state["staleness"].items()})
        self.busy_s, self.idle_s = float(state["busy_s"]), float(state["idle_s"])
        self.past_budget = int(state["past_budget"])
        self.per_worker = collections.Counter({int(k): int(v) for k, v in state["per_worker"].items()})


def _wait_any(requests: list[MPI.Request]) -> int:
    """The index of a completed request, by polling: ``Testany``, then a sleep of 50 us doubling to
    1 ms between polls (MPICH's ``Waitany`` would spin a core the workers may need; module docstring)."""
    pause = 50e-6
    while True:
        index, done = MPI.Request.Testany(requests)
        if done:
            return index
        time.sleep(pause)
        pause = min(2 * pause, 1e-3)


def _send(comm: MPI.Comm, flat: torch.Tensor, dest: int, tag: int) -> None:
    """Zero-copy Send of a flat buffer (through host memory when MPI cannot read device memory)."""
    staged = flat.cpu() if flat.is_cuda and not world.cuda_aware() else flat
    comm.Send(world.buf(staged), dest=dest, tag=tag)
    world.traffic.add(sent=flat.nbytes)


def _recv(comm: MPI.Comm, flat: torch.Tensor, source: int, tag: int) -> None:
    staged = torch.empty_like(flat, device="cpu") if flat.is_cuda and not world.cuda_aware() else flat
    comm.Recv(world.buf(staged), source=source, tag=tag)
    world.traffic.add(received=flat.nbytes)
    if staged is not flat:
        flat.copy_(staged)
