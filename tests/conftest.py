"""Shared test set-up.

Under ``mpirun ... pytest --with-mpi`` a test failing on one rank would leave its peers blocked
in the next collective until CI times out. The hook below prints the failure with its rank and
aborts the whole MPI job at once, so a run fails fast and says where. Ranks other than 0 are
quiet otherwise, so the log shows one copy of pytest's report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

REDUCE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (rtol, atol) of a reduction against a float64 reference over ~N(0,1) inputs: the half types are
# rounded once per stage (an shm stage, a step of a ring)
REDUCE_TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
    torch.float16: (4e-3, 1e-2),
    torch.bfloat16: (3e-2, 6e-2),
}
BIN = Path(sys.executable).parent


def assert_compressor_resumes_bit_exactly(name: str, options: dict, numel: int, key: int = 2):
    """Six steps of compressor ``name`` on one rank; a second one loads the first's
    ``state_dict()`` after step 2 and must give the same bits from step 3 on. Returns the first
    compressor and the state it handed over."""
    from mpi4py import MPI

    from mpilm.comm import compress

    straight, resumed = compress.make_compressor(name, **options), compress.make_compressor(name, **options)
    grads = [torch.randn(numel, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    outputs, handed = [], None
    for step, grad in enumerate(grads):
        bucket = grad.clone()
        straight.allreduce_(bucket, key, MPI.COMM_SELF, "auto", step)
        outputs.append(bucket)
        if step == 2:
            handed = straight.state_dict()
            resumed.load_state_dict(handed)
    for step, grad in list(enumerate(grads))[3:]:
        bucket = grad.clone()
        resumed.allreduce_(bucket, key, MPI.COMM_SELF, "auto", step)
        assert torch.equal(bucket, outputs[step])
    return straight, handed


def _under_mpi(config) -> bool:
    return bool(config.getoption("--with-mpi", default=False))


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if _under_mpi(config):
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_rank() != 0:
            # one report per run: other ranks' stdout goes nowhere, their stderr (failures) stays.
            # The terminal reporter writes through its own saved copy of stdout (the dup2 alone
            # left every rank printing pytest-mpi's header and a summary line), so it goes too.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
            reporter = config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                config.pluginmanager.unregister(reporter)


def pytest_runtest_logreport(report):
    if not report.failed:
        return
    from mpi4py import MPI  # already initialised under --with-mpi; cheap otherwise

    if not MPI.Is_initialized() or MPI.COMM_WORLD.Get_size() == 1:
        return
    r = MPI.COMM_WORLD.Get_rank()
    text = f"FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n"
    sys.stderr.write("".join(f"[rank {r}] {line}\n" for line in text.splitlines()))
    sys.stderr.flush()
    MPI.COMM_WORLD.Abort(1)


def run_cli(args: list[str], np: int = 1, timeout: float = 240, env: dict | None = None, cwd=None,
            prefix: list[str] = ()):
    """Run ``mpirun -np N [prefix...] python <args>`` in a fresh process group, bounded by ``timeout``.

    ``env`` adds to this process's environment; a value of None removes that variable. Returns the
    CompletedProcess (text mode). Used by tests that check the real command line.
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_", "HYDRA"))}
    full_env.update(env or {})
    full_env = {k: v for k, v in full_env.items() if v is not None}
    full_env.setdefault("PYTHONPATH", str(ROOT))
    cmd = [str(BIN / "mpirun"), "-np", str(np), *prefix, str(BIN / "python"), *args]
    return subprocess.run(
        ["timeout", "--kill-after=5", str(timeout), *cmd],
        capture_output=True, text=True, env=full_env, cwd=cwd or ROOT,
    )


@pytest.fixture
def cli():
    return run_cli


def isolated_collective_settings():
    """For collective test modules (made a module-scoped autouse fixture there): ``auto`` must not
    read the developer's ~/.cache tuning file (pointed at a missing one), and up to 5 ranks share
    2 cores (one torch thread each); both restored for the other modules."""
    from mpilm.comm import tuning

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tuning.use_file(Path(tempfile.gettempdir()) / "mpilm-tests-no-such-tuning-file.json")
    yield
    tuning.use_file(None)
    torch.set_num_threads(threads)
