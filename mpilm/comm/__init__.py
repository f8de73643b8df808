"""mpilm's communication layer: MPI start-up (``world``), collectives, compression, grad sync.

``mpilm.comm.allreduce`` / ``reduce_scatter`` / ``allgather`` are re-exported from
``collectives``. Nothing under ``comm/`` imports the models. The collective modules import one
way (``common`` at the bottom, ``collectives`` at the top: see ``common.py``); any of them can
be imported on its own.
"""

from mpilm.comm.collectives import allgather, allreduce, reduce_scatter  # noqa: F401
