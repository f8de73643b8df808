"""mpilm's benchmarks: ``python -m mpilm.bench <name> ...`` (see ``__main__.py`` for the list).

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args)``; it
prints a table, and can write ``--json`` and ``--plot``. Benchmarks report medians and ratios
measured side by side in one run; tests only check that they run and that their output is sane.
"""
