"""The banner's MPI line (``world.mpi_description``): library and version as the library names
itself at run time, the thread level granted, and whether it is CUDA-aware. Serial, pure."""

import pytest
from mpi4py import MPI

from mpilm.comm import world

LIBRARIES = [
    ("MPICH Version:      5.0.2\nMPICH Release date: Fri Sep 25 2026\n", "MPICH 5.0.2"),
    ("Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4, repo rev: v4.1.4, May 26, 2022\x00", "Open MPI v4.1.4"),
    ("Intel(R) MPI Library 2021.6 for Linux* OS\n", "Intel(R) MPI Library 2021.6 for Linux* OS"),
]


@pytest.mark.parametrize("text,short", LIBRARIES)
def test_library_version_is_one_short_line(monkeypatch, text, short):
    monkeypatch.setattr(world.MPI, "Get_library_version", lambda: text.rstrip("\x00"))
    assert world.library_version() == short


@pytest.mark.parametrize("library,forced,says", [
    (True, None, "CUDA-aware: yes"),
    (False, None, "CUDA-aware: no"),
    (None, None, "CUDA-aware: unknown, taken as no"),
    (False, "1", "CUDA-aware: yes (MPILM_CUDA_AWARE=1)"),
])
def test_description_names_thread_level_and_cuda_awareness(monkeypatch, library, forced, says):
    monkeypatch.setattr(world, "library_cuda_support", lambda: library)
    monkeypatch.setattr(world.MPI, "Query_thread", lambda: MPI.THREAD_SERIALIZED)
    if forced is None:
        monkeypatch.delenv("MPILM_CUDA_AWARE", raising=False)
    else:
        monkeypatch.setenv("MPILM_CUDA_AWARE", forced)
    line = world.mpi_description()
    assert line.startswith(f"{world.library_version()} | thread level serialized | ")
    assert says in line


def test_this_library_answers_the_cuda_query():
    """MPICH >= 4 and Open MPI both have MPIX_Query_cuda_support (the wheel's MPICH: no GPU support)."""
    assert world.library_cuda_support() in (True, False)
