"""Stale gradients without MPI: one process replays async SGD's arithmetic with a fixed delay.

``python tools/async_delay.py --delay D [--lr LR] [--beta1 B] [--lookahead K] [-- TRAIN OPTIONS]``

Does: builds the trainer's Run on one process (``mpilm.run.build`` over ``COMM_SELF``) and takes
``--steps`` updates; update t applies, at the current parameters, the gradient computed at the
parameters of update t - D (optionally extrapolated, p + K (p - p_previous), as a look-ahead
remedy), with batches drawn alternately from corpus blocks 1 and 2 (two async workers' streams)
and the trainer's own clip, AdamW/SGD and learning-rate schedule. Prints the final val loss.
With D = 0 this is the one-worker async run (and matches it); with D = 1 it is what two workers
taking turns give the server, minus the nondeterminism of arrival order. So it tells whether a
loss gap of ``--sync async`` comes from the transport or from the optimizer meeting stale
gradients (README "Training modes, measured").

Does not: talk to peers or time anything; model async's varying staleness (the delay is fixed).

Limits: keeps D + 2 copies of the parameters; CPU or one GPU, like any single-process run.
"""

from __future__ import annotations

import argparse
import sys

from mpi4py import MPI

from mpilm import config, optim, run


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=int, required=True, help="updates between a gradient's parameters and its use")
    parser.add_argument("--beta1", type=float, default=None, help="override AdamW's beta1 (the first moment's decay)")
    parser.add_argument("--lookahead", type=float, default=0.0,
                        help="compute each gradient at p + K (p - p_previous) instead of p (0: off)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then mpilm.train options (model, --steps, --lr)")
    args = parser.parse_args(argv)
    if args.delay < 0:
        parser.error(f"--delay {args.delay}: must be >= 0")
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    cfg = config.parse([*train_args, "--out", "/tmp/mpilm-async-delay"], quiet=True)
    job = run.build(cfg, MPI.COMM_SELF)
    if args.beta1 is not None:
        for group in job.optimizer.param_groups:
            group["betas"] = (args.beta1, group["betas"][1])
    flats = list(job.grads.flat_params.values())
    history = [[f.clone() for f in flats]]  # parameters after each update, newest last
    for t in range(cfg.steps):
        current = [f.clone() for f in flats]
        at = max(0, len(history) - 1 - args.delay)
        for flat, old, older in zip(flats, history[at], history[max(0, at - 1)]):
            flat.copy_(old + args.lookahead * (old - older))
        job.data_rank = 1 + t % 2  # two workers' blocks, taking turns
        job.compute_gradients(t // 2)
        for flat, keep in zip(flats, current):
            flat.copy_(keep)
        job.apply_gradients(optim.lr_at(t, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio))
        history = [*history, [f.clone() for f in flats]][-(args.delay + 2):]
    print(f"delay {args.delay} beta1 {args.beta1 if args.beta1 is not None else 'default'} lookahead {args.lookahead:g}: "
          f"val loss {job.evaluate():.4f}")
    job.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
