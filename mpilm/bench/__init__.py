"""mpilm's benchmarks: ``python -m mpilm.bench <name> ...`` (see ``__main__.py`` for the list).

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args)``; it
prints a table, and can write ``--json`` and ``--plot``. Benchmarks report medians and ratios
measured side by side in one run; tests only check that they run and that their output is sane.
"""

from mpilm.errors import UsageError


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run on headless nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def parse_algorithms(text: str, flag: str = "--algorithms") -> list[str]:
    """A comma-separated list of allreduce algorithm names, checked (UsageError on every rank)."""
    from mpilm.comm import collectives

    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise UsageError(f"{flag}: empty list; name at least one of " + ",".join(collectives.ALGORITHMS))
    for name in names:
        if name not in collectives.ALGORITHMS:
            raise UsageError(f"{flag} {name}: unknown; choose from {','.join(collectives.ALGORITHMS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"{flag} {text}: an algorithm is listed twice")
    return names
