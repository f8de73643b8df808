"""Entry point: ``python -m mpilm.bench {allreduce,compress,convergence,scaling,ddp,model,sync-modes,chaos,report} ...``.

Dispatches to ``mpilm.bench.<name>``; each module defines ``DESCRIPTION``, ``add_arguments`` and
``run``. Errors follow the project's policy (``error: ...``, exit 2; never a hang).
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "allreduce": "allreduce bandwidth/latency sweep of every algorithm vs MPI_Allreduce (nccl-tests style)",
    "compress": "top-k selection and sparse accumulation kernels vs torch",
    "convergence": "final loss and bytes moved for each gradient compressor",
    "scaling": "throughput, speed-up and efficiency vs number of ranks",
    "ddp": "mpilm vs torch DistributedDataParallel on the same model and data",
    "model": "alpha-beta cost model fitted to this machine; predicted scaling",
    "sync-modes": "sync vs async vs local SGD vs DiLoCo vs top-k at one token budget: val loss, wall time, bytes",
    "chaos": "K random faults (killed ranks and nodes, dead links, stalled nodes) with --resume auto vs an uninterrupted run",
    "report": "one scaling table (speed-up, efficiency, comm, MFU, val loss), JSON and PNG from finished runs",
}


def module_name(subcommand: str) -> str:
    """The module of a subcommand: ``sync-modes`` lives in ``sync_modes.py``."""
    return subcommand.replace("-", "_")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpilm.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=name)
        # import lazily per subcommand: a missing optional dependency of one bench must not break the others
        if argv is None and len(sys.argv) > 1 and sys.argv[1] != name:
            continue
        if argv is not None and (not argv or argv[0] != name):
            continue
        importlib.import_module(f"mpilm.bench.{module_name(name)}").add_arguments(p)
    args = parser.parse_args(argv)
    module = importlib.import_module(f"mpilm.bench.{module_name(args._module)}")

    from mpilm.comm import world  # starts MPI only once we know there is work to do

    return world.run_main(module.run, args)


if __name__ == "__main__":
    sys.exit(main())
