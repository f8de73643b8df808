"""Asynchronous SGD with parameter servers (``--sync async``): workers never wait for each other.

Does: ranks 0 .. K-1 (``--ps-ranks K``, default 1) are the servers; each holds one contiguous slice
of every flat parameter buffer (``common.shard_bounds``) and the optimizer state of that slice
(``optim.SliceOptimizer``). Every other rank is a worker: it computes a gradient on its own block
with the parameters it last received, measures the whole gradient's norm, and sends every server
a small header (the version of that server's slice it used, its signal flag, its loss, the norm)
and that server's slice of each flat gradient buffer (zero-copy nonblocking sends of views of the
buffers the hooks fill); the fresh slices land directly in its flat parameter buffer. A server
takes gradients in arrival order (one posted header receive per worker, no barrier), applies each
one to its slice (clipped by the worker's norm, so K servers clip exactly as one would; optimizer
step at the schedule's learning rate) and answers that worker alone. K servers divide the server's
work and the traffic on its link by K; they never talk to each other while serving.

Rank 0, the lead server, keeps the budget and the run's control: ``--steps`` is the number of
gradients taken in all, one batch each, from whichever workers send them, so a fast worker
contributes more than a slow one. The lead grants a worker its next gradient when it answers the
last one (CONTINUE) while the budget has room, else answers STOP: exactly ``--steps`` gradients are
computed and every server takes each of them. A worker passes the lead's STOP or PAUSE on to the
other servers in a header of its own. A gradient's staleness is the number of updates its server
applied since the parameters it was computed with, judged by each server for its slice; with
``max_staleness`` >= 0 staler ones are dropped (counted, never applied: a stale update is not
merely smaller, it points the wrong way), and ``staleness_lr`` divides the learning rate by the
staleness (Zhang et al. 2016, arXiv 1511.05950). The summary's histogram, drops and updates are the
lead's; the busy share is every server's (the largest says whether servers are the bottleneck).

Points in time where all ranks meet: checkpoints and pre-emption. When the lead decides to pause
(every ``checkpoint_every`` updates, or a signal on any rank: workers report theirs in the header,
other servers theirs in their answers, which workers relay) it answers each worker's next gradient
with PAUSE; once every worker has its answers no message is in flight, every server's slice is
broadcast to every rank, and all ranks run the caller's collective ``checkpoint``; the lead then
says how much budget is left and the servers re-post their receives. At the end the servers'
slices are broadcast so every rank ends with the servers' model. An evaluation during the run (the
lead's, alone: the workers are busy) first fetches the other servers' slices, which they send
between gradients; one due while pausing waits for the pause, where every slice is at hand.

The servers wait by polling (``Testany``, then a sleep of 50 us doubling to 1 ms), not with
``Waitany``: MPICH's blocking wait spins a core, and a server that shares a node with workers (or a
small machine) would take that core from their forward and backward. The cost is at most 1 ms of
latency after an idle spell, against steps of tens of milliseconds or more.

Why two-sided messages and not MPI one-sided RMA: measured with ``tools/ps_transport.py`` (push
9.5 MiB, pull 9.5 MiB), Send/Recv took 3.1 ms against 7.9 ms for Put/Get under a passive-target
lock on one node (MPICH 5, shared memory), and 148 vs 149 ms across a 1 Gbit/s emulated link; and
RMA would still need a flag the server polls to learn that a gradient arrived, which testing the
posted receives gives for free.

With ``pipeline`` (``--async-pipeline``) a worker computes its next gradient while the last one
travels: the gradient goes out from a copy and the fresh parameters land in a buffer of their own,
copied into the model after that compute, so the exchange hides behind compute and every
gradient is one server update staler; the lead then grants each worker two gradients ahead.

Does not: bound a worker's lead over the others (the staleness rule does); pause once the budget
is fully granted: a checkpoint or a signal due then lets the run end.

Limits: needs K + 1 ranks or more. The order in which gradients arrive is not deterministic with 2+
workers, so only a one-worker run is bit-reproducible (and resumes bit-exactly); with K servers a
gradient may be dropped as stale by one server and applied by another. ``--steps`` counts the
gradients the lead takes (one worker's batch each; sync's S steps at N ranks are N x S of them),
and the learning-rate schedule, warm-up included, runs over each server's count of them.
"""

from __future__ import annotations

import collections
import time

import numpy as np
import torch
from mpi4py import MPI

from mpilm import optim
from mpilm.comm import world
from mpilm.comm.common import shard_bounds
from mpilm.errors import UsageError

SERVER = 0  # the lead server: budget, pauses, stops, evaluation, the log
HEADER_TAG, GRADIENT_TAG, ANSWER_TAG, PARAMETER_TAG, FETCH_TAG, FETCHED_TAG = range(31_001, 31_007)
CONTINUE, PAUSE, PAUSE_AND_STOP, STOP = 0, 1, 2, 3  # the lead's answer; also a header's kind when a worker passes it on
GRADIENT = -1  # a header's kind: a gradient follows
FETCH, CLOSE = 1, 0  # what the lead asks another server for: its slice, or nothing more (the run is over)
HEADER_FIELDS = 5  # kind, the version of the server's slice used, the worker's signal flag, its loss, the gradient's norm


def server_slices(grads, servers: int, rank: int) -> list[tuple[torch.dtype, int, int]]:
    """``rank``'s slice of every flat buffer when ``servers`` ranks serve (none for a worker)."""
    if rank >= servers:
        return []
    return [(dtype, *shard_bounds(flat.numel(), servers, rank)) for dtype, flat in grads.flat.items()]


class AsyncSGD:
    name = "async"

    def __init__(self, grads, comm: MPI.Comm, max_staleness: int, staleness_lr: bool, servers: int = 1,
                 pipeline: bool = False):
        self.grads, self.comm = grads, comm
        self.max_staleness, self.staleness_lr = max_staleness, staleness_lr
        self.servers, self.rank, self.pipeline = servers, comm.Get_rank(), pipeline
        self.workers = list(range(servers, comm.Get_size()))
        if pipeline and self.rank >= servers:  # a worker's gradient in flight and parameters arriving,
            # apart from the buffers the next forward and backward use
            self._outbox = {d: torch.empty_like(f) for d, f in grads.flat.items()}
            self._landing = {d: torch.empty_like(f) for d, f in grads.flat_params.items()}
        self.version = 0  # a server: updates applied to its slice; a worker: the lead's, as last heard
        self.held = [0] * servers  # a worker: the version of each server's slice it holds
        self.dropped = 0
        self.per_worker: collections.Counter = collections.Counter()  # worker rank -> gradients taken from it
        self.staleness: collections.Counter = collections.Counter()  # staleness -> gradients seen (server)
        self.busy_s = 0.0  # server: seconds applying gradients and answering
        self.idle_s = 0.0  # server: seconds waiting for the next gradient

    def describe(self) -> str:
        rule = ("none dropped" if self.max_staleness < 0 else f"staler than {self.max_staleness} dropped")
        serving = (f"rank {SERVER} is the parameter server" if self.servers == 1 else
                   f"ranks 0-{self.servers - 1} are parameter servers, each holding 1/{self.servers} of the parameters "
                   f"and their optimizer state")
        pipelined = ", each computing its next gradient while the last one travels" if self.pipeline else ""
        return (f"async SGD: {serving}, {len(self.workers)} worker(s) push gradients and pull parameters without "
                f"waiting for each other{pipelined} ({rule}{', lr / staleness' if self.staleness_lr else ''})")

    def after_step(self, step: int, timer) -> None:  # the Run's own step loop is not used in this mode
        raise RuntimeError("--sync async runs AsyncSGD.train, not Run.step")

    def _slice(self, flats: dict, server: int) -> list[torch.Tensor]:
        """``server``'s slice of each flat buffer in ``flats`` (views: received into in place)."""
        return [flat[slice(*shard_bounds(flat.numel(), self.servers, server))] for flat in flats.values()]

    def _grants(self, left: int) -> dict[int, int]:
        """Worker rank -> gradients granted when ``left`` of the budget is left: one each (two
        pipelined: the one in flight and the one computing), dealt in turn while the budget lasts."""
        depth = 2 if self.pipeline else 1
        slots = min(max(0, left), depth * len(self.workers))
        counts = {w: len(range(j, slots, len(self.workers))) for j, w in enumerate(self.workers)}
        return {w: n for w, n in counts.items() if n}

    # ---------------------------------------------------------------- the loop
    def train(self, run, *, checkpoint_every: int, checkpoint, signalled, log=None, evaluate_every: int = 0,
              log_every: int = 1) -> str:
        """Run until the lead server has taken ``--steps`` gradients in all; ``"done"`` or ``"preempted"``.

        ``checkpoint(version)``: collective, called on every rank at a pause. ``signalled()``: this
        rank got a pre-emption signal. ``log(record)``: the lead's progress (every ``log_every``
        updates; with ``val_loss`` every ``evaluate_every``).
        """
        # SYNC (start-up): what is left of the budget, by the lead's count (a resumed run may have none)
        left = self.comm.bcast(run.cfg.steps - self.taken if self.rank == SERVER else None, root=SERVER)
        self.seen_at_start = self.taken
        self.wall_start = time.perf_counter()
        if self.rank == SERVER:
            outcome = self._lead(run, left, checkpoint_every, checkpoint, signalled, log, evaluate_every, log_every)
        elif self.rank < self.servers:
            outcome = self._follow(run, left, checkpoint, signalled)
        else:
            outcome = self._work(run, left, checkpoint, signalled)
        if outcome == "done":
            self._assemble()  # SYNC: every rank ends with the servers' parameters
        return outcome

    @property
    def taken(self) -> int:
        """Server: gradients taken against the budget (applied, dropped as stale, or skipped as non-finite)."""
        return sum(self.staleness.values())

    def _work(self, run, left: int, checkpoint, signalled) -> str:
        """A worker: compute, send, take the answer; with ``pipeline`` the next gradient is computed
        while the last one travels (its answer is taken after that compute)."""
        timer = run.timer
        grants = self._grants(left).get(self.rank, 0)  # gradients this worker may compute
        pending = None  # the exchange in flight: (exchange, answers, t posted)
        command, relayed = CONTINUE, False  # the lead's last word; another server's signal to pass on
        while grants or pending is not None:
            timer.begin_step(run.step_index)
            outgoing = None
            if grants:
                grants -= 1
                outgoing = self._compute(run, signalled() or relayed)
            if pending is not None:  # pipelined: the last gradient's answer, after this one's compute
                command, relayed = self._settle(run, *pending)
                grants += command == CONTINUE
                pending = None
            if outgoing is not None:
                pending = self._send_gradient(run, outgoing)
                if not self.pipeline:
                    command, relayed = self._settle(run, *pending)
                    grants += command == CONTINUE
                    pending = None
            timer.end_step()
            if pending is not None or command == CONTINUE:
                continue
            # nothing in flight and the lead said PAUSE or STOP: the other servers re-posted a
            # receive for this worker's next header; they get the lead's word instead
            for server in range(1, self.servers):
                word = np.zeros(HEADER_FIELDS)
                word[0] = command
                self.comm.Send(word, dest=server, tag=HEADER_TAG)  # small: does not wait for the server
            if command == STOP:
                break
            left = self._pause(run, checkpoint, stopping=command == PAUSE_AND_STOP)
            if left is None:
                return "preempted"
            grants, command = self._grants(left).get(self.rank, 0), CONTINUE
        return "done"

    def _compute(self, run, signal: bool) -> tuple:
        """A worker: one gradient with the parameters it holds; returns its step and its headers,
        one per server."""
        step = run.step_index
        loss = run.compute_gradients(step)
        with run.timer.phase("optimizer"):  # measured here, where the whole gradient is; each server clips by it
            norm = optim.clip_(list(self.grads.flat.values()), 0.0)
        loss_f, norm_f = float(loss), float(norm)  # one device sync on CUDA
        headers = np.array([(GRADIENT, self.held[server], float(signal), loss_f, norm_f)
                            for server in range(self.servers)])
        run.losses.append(loss)
        run.step_index += 1
        return step, headers

    def _send_gradient(self, run, outgoing: tuple) -> tuple:
        """A worker: send every server its header and slice, post the receives of its answer and its
        fresh slice. Pipelined, the gradient goes out from a copy (the next backward overwrites the
        buffer) and the slices land apart (the next compute reads the model's); the exchange before
        is settled by now, so nothing of it still reads or writes those copies."""
        step, headers = outgoing
        if self.pipeline:
            with run.timer.phase("optimizer"):
                for dtype, flat in self.grads.flat.items():
                    self._outbox[dtype].copy_(flat)
        gradient = self._outbox if self.pipeline else self.grads.flat
        landing = self._landing if self.pipeline else self.grads.flat_params
        answers = np.zeros((self.servers, 3), dtype=np.int64)  # per server: its version, the lead's command, a signal
        exchange = _Exchange(self.comm)
        for server in range(self.servers):  # every server at once: each link carries its slice
            exchange.send(headers[server], server, HEADER_TAG)
            for piece in self._slice(gradient, server):
                exchange.send(piece, server, GRADIENT_TAG)
            exchange.receive(answers[server], server, ANSWER_TAG)
            for piece in self._slice(landing, server):
                exchange.receive(piece, server, PARAMETER_TAG)
        return step, exchange, answers, time.perf_counter()

    def _settle(self, run, step: int, exchange, answers: np.ndarray, t_posted: float) -> tuple[int, bool]:
        """A worker: wait for gradient ``step``'s answers and take in the fresh parameters; returns
        the lead's command and whether another server reported a signal."""
        with run.timer.phase("comm"), run.watched(f"the parameter servers' answers to gradient {step}"):
            exchange.wait()  # SYNC: blocks on every server's answer (servers only, never another worker)
        run.timer.add("comm_total", time.perf_counter() - t_posted)
        if self.pipeline:
            with run.timer.phase("optimizer"):
                for dtype, flat in self.grads.flat_params.items():
                    flat.copy_(self._landing[dtype])
        self.held = [int(v) for v in answers[:, 0]]
        self.version = self.held[SERVER]
        return int(answers[SERVER, 1]), bool(answers[1:, 2].any())

    def _take(self, run, worker: int, header: np.ndarray) -> int:
        """Server: receive ``worker``'s gradient for this server's slice and apply it (or drop it);
        returns its staleness."""
        cfg, comm = run.cfg, self.comm
        _, version_used, _, loss, norm = header
        with run.timer.phase("comm"):
            for piece in self._slice(self.grads.flat, self.rank):
                _recv(comm, piece, worker, GRADIENT_TAG)  # the gradient lands where param.grad points
        staleness = self.version - int(version_used)
        index = self.taken  # this gradient's place in the budget and in the lr schedule
        self.staleness[staleness] += 1
        self.per_worker[worker] += 1
        if 0 <= self.max_staleness < staleness:
            self.dropped += 1
            return staleness
        lr = optim.lr_at(index, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        if run.apply_gradients(lr / max(1, staleness) if self.staleness_lr else lr,
                               norm=torch.tensor(norm, dtype=torch.float32, device=run.device)):
            self.version += 1
            run.step_index = self.version  # the server's slice is this many updates old
            run.losses.append(torch.tensor(loss))  # the workers' losses, as this server saw them
        else:
            run.skipped_steps += 1
        return staleness

    def _answer(self, worker: int, command: int, signal: bool) -> None:
        """Server: the answer to ``worker``'s gradient, then this server's fresh slice."""
        answer = np.array([self.version, command, int(signal)], dtype=np.int64)
        self.comm.Send(answer, dest=worker, tag=ANSWER_TAG)  # the worker posted its receives with its gradient
        for piece in self._slice(self.grads.flat_params, self.rank):
            _send(self.comm, piece, worker, PARAMETER_TAG)

    def _post(self, headers: dict, workers) -> dict:
        return {w: self.comm.Irecv(headers[w], source=w, tag=HEADER_TAG) for w in workers}

    def _lead(self, run, left, checkpoint_every, checkpoint, signalled, log, evaluate_every, log_every) -> str:
        cfg, timer = run.cfg, run.timer
        budget = cfg.steps
        headers = {w: np.zeros(HEADER_FIELDS) for w in self.workers}
        outstanding = self._grants(left)  # worker -> gradients granted to it and not yet taken
        receives = self._post(headers, outstanding)
        granted = self.taken + sum(outstanding.values())  # gradients promised: taken, or being computed
        pausing, paused, stopping = False, set(), False
        window_losses, window_staleness, t_window = [], [], time.perf_counter()
        held_back, evaluation_due = [], False  # log records, and an evaluation, waiting for the pause

        def make_record() -> dict:  # the updates since the last record
            nonlocal window_losses, window_staleness, t_window
            record = {"step": self.version, "loss": float(np.mean(window_losses)),
                      "staleness_mean": float(np.mean(window_staleness)), "dropped": self.dropped,
                      "updates_per_s": len(window_losses) / max(1e-9, time.perf_counter() - t_window)}
            window_losses, window_staleness, t_window = [], [], time.perf_counter()
            return record
        next_checkpoint = (self.version // checkpoint_every + 1) * checkpoint_every if checkpoint_every else None
        while receives:
            timer.begin_step(self.version)
            t0 = time.perf_counter()
            order = list(receives)
            with timer.phase("comm"), run.watched(f"a gradient from any of workers {world.compact_cores(order)}"):
                worker = order[_wait_any([receives[w] for w in order])]  # SYNC: blocks on whichever worker is first
            del receives[worker]
            outstanding[worker] -= 1
            t_busy = time.perf_counter()
            self.idle_s += t_busy - t0
            version_before = self.version
            staleness = self._take(run, worker, headers[worker])
            if self.version > version_before:
                window_losses.append(float(headers[worker][3]))
                window_staleness.append(staleness)
            # a pause needs every worker; once the whole budget is granted they are being stopped, and a
            # late signal or checkpoint lets the run finish instead
            room = granted < budget
            if (signalled() or headers[worker][2]) and room:
                pausing = stopping = True
            if next_checkpoint is not None and self.version >= next_checkpoint and room and not pausing:
                pausing = True
            if pausing:
                command = PAUSE_AND_STOP if stopping else PAUSE
            elif room:
                command, granted = CONTINUE, granted + 1
                outstanding[worker] += 1
            else:
                command = STOP
            with timer.phase("comm"):
                self._answer(worker, command, False)
            if outstanding[worker]:  # its next gradient is granted (pipelined: maybe on its way already)
                receives.update(self._post(headers, [worker]))
            elif pausing:
                paused.add(worker)  # nothing of it in flight: it waits for the pause
            self.busy_s += time.perf_counter() - t_busy
            timer.end_step()
            if log is not None and window_losses and (self.version % log_every == 0 or not receives and not paused):
                record = make_record()
                due = evaluate_every and self.version % evaluate_every == 0
                if pausing and self.servers > 1:  # the other servers may be in the pause already: its
                    held_back.append(record)       # assembled slices serve the evaluation, and the log waits
                    evaluation_due = evaluation_due or due
                else:
                    if due:
                        self._fetch_slices(run)
                        record["val_loss"] = run.evaluate(alone=True)
                    log(record)
            if paused and not receives:
                def log_held_back():  # at the pause, every slice at hand
                    if evaluation_due:
                        if window_losses:
                            held_back.append(make_record())
                        held_back[-1]["val_loss"] = run.evaluate(alone=True)  # the model at this version
                    for record in held_back:
                        log(record)

                left = self._pause(run, checkpoint, stopping, before_checkpoint=log_held_back if held_back else None)
                if left is None:
                    return "preempted"
                outstanding = self._grants(left)
                receives = self._post(headers, outstanding)
                granted = self.taken + sum(outstanding.values())
                paused, pausing, held_back, evaluation_due = set(), False, [], False
                next_checkpoint = (self.version // checkpoint_every + 1) * checkpoint_every
        self._close_fetches(run)
        return "done"

    def _follow(self, run, left, checkpoint, signalled) -> str:
        """Another server: take gradients for its slice until every worker has passed on the lead's STOP."""
        timer = run.timer
        headers = {w: np.zeros(HEADER_FIELDS) for w in self.workers}
        receives = self._post(headers, self._grants(left))
        fetch = self._post_fetch()
        paused, stopping = set(), False
        while receives:
            timer.begin_step(self.version)  # a step is one gradient: a fetch or a passed-on command begins it again
            t0 = time.perf_counter()
            order = list(receives)
            with timer.phase("comm"), run.watched(f"a gradient from any of workers {world.compact_cores(order)}"):
                # SYNC: blocks on the first worker (or the lead)
                index = _wait_any([receives[w] for w in order] + ([fetch] if fetch is not None else []))
            t_busy = time.perf_counter()
            self.idle_s += t_busy - t0
            if index == len(order):  # the lead evaluates and wants this slice, or it is done (before
                # the workers' STOP headers reached this server)
                fetch = self._answer_fetch()
            else:
                worker = order[index]
                del receives[worker]
                kind = int(headers[worker][0])
                if kind == GRADIENT:
                    self._take(run, worker, headers[worker])
                    with timer.phase("comm"):
                        self._answer(worker, CONTINUE, signalled())  # the lead decides; a signal goes to it by the worker
                    receives.update(self._post(headers, [worker]))
                    timer.end_step()
                elif kind in (PAUSE, PAUSE_AND_STOP):
                    paused.add(worker)
                    stopping = stopping or kind == PAUSE_AND_STOP
            self.busy_s += time.perf_counter() - t_busy
            if paused and not receives:
                left = self._pause(run, checkpoint, stopping, fetch=fetch)
                if left is None:
                    return "preempted"
                receives = self._post(headers, self._grants(left))
                paused = set()
        self._close_fetches(run, fetch)
        return "done"

    # ---------------------------------------------------------------- slices between servers
    def _fetch_slices(self, run) -> None:
        """The lead, before it evaluates: every other server's slice into its own model. Blocks on
        each of them; they answer between gradients."""
        for server in range(1, self.servers):
            with run.watched(f"server {server}'s slice of the parameters, for an evaluation"):
                self.comm.Send(np.array([FETCH], dtype=np.int64), dest=server, tag=FETCH_TAG)
                for piece in self._slice(self.grads.flat_params, server):
                    _recv(self.comm, piece, server, FETCHED_TAG)

    def _send_slice(self) -> None:
        for piece in self._slice(self.grads.flat_params, self.rank):
            _send(self.comm, piece, SERVER, FETCHED_TAG)

    def _post_fetch(self) -> MPI.Request:
        self._fetch_request = np.zeros(1, dtype=np.int64)  # FETCH or CLOSE, from the lead
        return self.comm.Irecv(self._fetch_request, source=SERVER, tag=FETCH_TAG)

    def _answer_fetch(self) -> MPI.Request | None:
        """Another server, once the lead's request has arrived: its slice (and the request re-posted),
        or nothing when the lead said CLOSE (returns None then)."""
        if int(self._fetch_request[0]) == CLOSE:
            return None
        self._send_slice()
        return self._post_fetch()

    def _close_fetches(self, run, fetch: MPI.Request | None = None) -> None:
        """The end of serving: the lead tells every other server it will fetch nothing more; they
        answer the lead's fetches until then (its last evaluation may come after their last gradient)."""
        if self.rank == SERVER:
            for server in range(1, self.servers):
                self.comm.Send(np.array([CLOSE], dtype=np.int64), dest=server, tag=FETCH_TAG)
        elif self.rank < self.servers:
            while fetch is not None:
                with run.watched("the lead server's last fetch or its word that it is done"):
                    _wait_any([fetch])  # SYNC: blocks on the lead, serving its last gradients or evaluating
                fetch = self._answer_fetch()

    # ---------------------------------------------------------------- where all ranks meet
    def _pause(self, run, checkpoint, stopping: bool, before_checkpoint=None, fetch=None) -> int | None:
        """Every rank, once no message is in flight: the slices assembled, the checkpoint written;
        returns the budget left (None: the run stops here, pre-empted). SYNC."""
        self._assemble()
        if before_checkpoint is not None:
            before_checkpoint()  # the lead's evaluation that waited for the pause
        checkpoint(self.version)  # SYNC: every rank (the lead's version names it)
        if stopping:
            self._close_fetches(run, fetch)
            return None
        return self.comm.bcast(run.cfg.steps - self.taken if self.rank == SERVER else None, root=SERVER)

    def _assemble(self) -> None:
        """SYNC: every server's slice (and version) to every rank: all ranks hold the servers' model."""
        versions = self.comm.allgather(self.version)[:self.servers]  # small, at pauses and the end only
        for server in range(self.servers):
            for piece in self._slice(self.grads.flat_params, server):
                world.bcast_(piece, self.comm, root=server)
        if self.rank >= self.servers:
            self.held, self.version = versions, versions[SERVER]

    def summary(self) -> dict:
        """The lead's figures (updates, dropped, staleness histogram) and every server's busy share.
        SYNC: every rank calls it (the busy shares are gathered)."""
        shares = self.comm.allgather(self.busy_s / max(1e-9, self.busy_s + self.idle_s))[:self.servers]
        seen = self.taken
        return {"updates": self.version, "dropped_gradients": self.dropped, "ps_ranks": self.servers,
                "gradients_this_run": seen - getattr(self, "seen_at_start", 0),
                "gradients_per_worker": {str(k): v for k, v in sorted(self.per_worker.items())},
                "async_wall_s": time.perf_counter() - getattr(self, "wall_start", time.perf_counter()),
                "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
                "staleness_mean": sum(k * v for k, v in self.staleness.items()) / seen if seen else 0.0,
                "server_busy_share": max(shares), "server_busy_shares": shares}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"version": self.version, "held": list(self.held), "ps_ranks": self.servers, "dropped": self.dropped,
                "staleness": dict(self.staleness), "per_worker": dict(self.per_worker), "busy_s": self.busy_s,
                "idle_s": self.idle_s}

    def load_state_dict(self, state: dict) -> None:
        servers = int(state.get("ps_ranks", 1))
        if servers != self.servers:
            raise UsageError(f"the checkpoint was written with --ps-ranks {servers} and this run has --ps-ranks "
                             f"{self.servers}: each server's optimizer state covers its own slice; resume with "
                             f"--ps-ranks {servers}")
        self.version, self.dropped = int(state["version"]), int(state["dropped"])
        self.held = [int(v) for v in state.get("held", [self.version])]
        self.staleness = collections.Counter({int(k): int(v) for k, v in state["staleness"].items()})
        self.busy_s, self.idle_s = float(state["busy_s"]), float(state["idle_s"])
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


class _Exchange:
    """Nonblocking sends and receives, waited for together: flat-buffer views zero-copy (through host
    memory when MPI cannot read device memory), small numpy arrays as they are."""

    def __init__(self, comm: MPI.Comm):
        self.comm, self.requests, self.kept, self.landing = comm, [], [], []

    def send(self, data, dest: int, tag: int) -> None:
        if isinstance(data, torch.Tensor):
            staged = data.cpu() if data.is_cuda and not world.cuda_aware() else data
            self.kept.append(staged)  # alive until the request completes
            self.requests.append(self.comm.Isend(world.buf(staged), dest=dest, tag=tag))
            world.traffic.add(sent=data.nbytes)
        else:
            self.kept.append(data)
            self.requests.append(self.comm.Isend(data, dest=dest, tag=tag))

    def receive(self, data, source: int, tag: int) -> None:
        if isinstance(data, torch.Tensor):
            staged = torch.empty_like(data, device="cpu") if data.is_cuda and not world.cuda_aware() else data
            if staged is not data:
                self.landing.append((staged, data))
            self.requests.append(self.comm.Irecv(world.buf(staged), source=source, tag=tag))
            world.traffic.add(received=data.nbytes)
        else:
            self.kept.append(data)
            self.requests.append(self.comm.Irecv(data, source=source, tag=tag))

    def wait(self) -> None:
        """SYNC: blocks until every posted send and receive completes."""
        MPI.Request.Waitall(self.requests)
        for staged, data in self.landing:
            data.copy_(staged)


def _send(comm: MPI.Comm, flat: torch.Tensor, dest: int, tag: int) -> None:
    """Send of a flat buffer (view), zero-copy; blocks until MPI may reuse it."""
    exchange = _Exchange(comm)
    exchange.send(flat, dest, tag)
    exchange.wait()


def _recv(comm: MPI.Comm, flat: torch.Tensor, source: int, tag: int) -> None:
    """Receive into a flat buffer (view), zero-copy; blocks until it has landed."""
    exchange = _Exchange(comm)
    exchange.receive(flat, source, tag)
    exchange.wait()
