"""A throw-away Slurm on this machine, for ``make test-slurm``: munged, slurmctld and slurmd, one node.

What it does:
- ``install()``: Debian's ``slurm-wlm`` and ``munge`` when a daemon is missing (``apt-get update``
  once, then ``apt-get install -y``).
- ``LocalSlurm(workdir)``, a context manager: writes a munge key, ``slurm.conf`` and ``gres.conf``
  under ``workdir`` (state, spool, logs and pid files there too, free TCP ports), starts munged,
  slurmctld and slurmd in the foreground as children of this process, and waits until the node
  is idle. The daemons run in a session of their own, so a signal to this process group (what
  ``timeout`` sends) reaches this process alone, and SIGTERM becomes KeyboardInterrupt while it
  is up (pytest then stops and tears its fixtures down). On exit, also after a failed check, an
  exception or that SIGTERM, it cancels every job, waits for them to end, and stops each daemon
  it started by its pid (SIGTERM, then SIGKILL after 10 s).
- ``sbatch(script, *args)`` -> job id, ``wait(job)`` -> the job's final fields (``JobState``,
  ``ExitCode``, ``Restarts``, ...), ``run(*argv)``: Slurm commands pointed at this configuration
  through ``SLURM_CONF``.

What it does not: read or change ``/etc/slurm``, the machine's munge key or running daemons; it
keeps no accounting (``scontrol show job`` answers for 5 minutes after a job ends).

Limits: needs root (``SlurmUser=root``, ``apt-get``) and Debian's packages. One node, named after
this machine, that claims 16 CPUs and 16 GPUs (``SlurmdParameters=config_overrides``; GPUs as a
count with no device files) so the project's scripts, which ask for GPUs and one task per GPU,
are scheduled as written; the tasks share this machine's cores and see no GPU.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
PACKAGES = ("slurm-wlm", "munge")
NODE_CPUS = 16
NODE_GPUS = 16
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}


def install() -> None:
    """apt-get the packages when a daemon is missing; RuntimeError with apt's own words if it fails."""
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait_for_lock = ["-o", "DPkg::Lock::Timeout=300"]  # another apt-get (make test-system-mpi) may hold it
    for argv in (["apt-get", *wait_for_lock, "update", "-qq"],
                 ["apt-get", *wait_for_lock, "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()[-2000:]}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    def __init__(self, workdir: Path, name: str = "mpilmtest", first_job_id: int | None = None):
        self.dir = Path(workdir)
        self.name = name
        self.host = socket.gethostname()
        self.conf = self.dir / "slurm.conf"
        # job ids from a random start: MPICH names its shared-memory segments after the PMI job id
        # (srun --mpi=pmi2 gives "<job>.<step>") and a crashed job leaves its segment in /dev/shm,
        # so with ids restarting at 1 each time, one crash of job K broke job K of every later run
        self.first_job_id = first_job_id or random.randrange(100_000, 60_000_000)
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: dict[str, subprocess.Popen] = {}
        self._previous_sigterm = None

    # ------------------------------------------------------------ configuration
    def _configure(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "munge", "munge-key", "dev"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # munged wants every directory above its socket searchable by all
        os.chmod(d / "munge", 0o755)
        os.chmod(d / "munge-key", 0o700)
        key = d / "munge-key" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = d / "munge" / "munge.socket"
        # GPUs for the scheduler only: character devices with /dev/null's numbers (gres/gpu wants
        # device files to count); nothing opens them
        gpus = [d / "dev" / f"gpu{i}" for i in range(NODE_GPUS)]
        for gpu in gpus:
            if not gpu.exists():
                os.mknod(gpu, 0o644 | stat.S_IFCHR, os.makedev(1, 3))
        self.conf.write_text(f"""\
# generated by tests/local_slurm.py: one node, everything under {d}
ClusterName={self.name}
FirstJobId={self.first_job_id}
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
KillWait=5
MinJobAge=300
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} Gres=gpu:{NODE_GPUS} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (d / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File={d / 'dev'}/gpu[0-{NODE_GPUS - 1}]\n")

    # ------------------------------------------------------------ daemons
    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / f"{name}.out", "w")
        self.daemons[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                              stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _alive_or_raise(self) -> None:
        for name, proc in self.daemons.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{self.logs(name)}")

    def logs(self, name: str) -> str:
        text = ""
        for path in (self.dir / f"{name}.out", self.dir / f"{name}.log"):
            if path.exists():
                text += path.read_text(errors="replace")[-3000:]
        return text

    def __enter__(self) -> LocalSlurm:
        install()
        self._configure()
        # SIGTERM (a timeout around the tests) must still reach the clean-up below
        self._previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        try:
            d = self.dir / "munge"
            self._start("munged", [_sbin("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                                   f"--key-file={self.dir / 'munge-key' / 'munge.key'}", f"--pid-file={d / 'munged.pid'}",
                                   f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"])
            self._wait_for(lambda: self.munge_socket.exists(), "munged's socket", 15)
            self._start("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._start("slurmd", [_sbin("slurmd"), "-D", "-f", str(self.conf)])
            self._wait_for(self._node_idle, "the node to be idle", 40)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _node_idle(self) -> bool:
        done = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def _wait_for(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self._alive_or_raise()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}:\n"
                                   + "\n".join(f"--- {n}\n{self.logs(n)}" for n in self.daemons))
            time.sleep(0.3)

    def __exit__(self, *exc) -> None:
        try:
            if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
                self.run("scancel", "--full", "--user", "root", check=False)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(0.5)
        finally:
            for name in reversed(list(self.daemons)):  # slurmd, slurmctld, then munged
                proc = self.daemons[name]
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)

    # ------------------------------------------------------------ commands
    def run(self, *argv: str, check: bool = True, timeout: float = 60, env: dict | None = None,
            cwd=None) -> subprocess.CompletedProcess:
        done = subprocess.run(["timeout", "--kill-after=5", str(timeout), *argv], capture_output=True, text=True,
                              env={**self.env, **(env or {})}, cwd=cwd)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
        return done

    def sbatch(self, script, *args: str, env: dict | None = None, cwd=None) -> str:
        return self.run("sbatch", "--parsable", *args, str(script), env=env, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The fields of ``scontrol show job -o`` (``JobState``, ``ExitCode``, ``Restarts``, ``StdOut``, ...)."""
        line = self.run("scontrol", "show", "job", "-o", job_id).stdout.strip()
        return dict(word.split("=", 1) for word in line.split() if "=" in word)

    def wait(self, job_id: str, timeout: float = 150) -> dict[str, str]:
        """Blocks on the job reaching a final state; RuntimeError with its output after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if fields.get("JobState") in FINAL_STATES:
                return fields
            self._alive_or_raise()
            if time.monotonic() > deadline:
                out = Path(fields.get("StdOut", "/nonexistent"))
                tail = out.read_text(errors="replace")[-3000:] if out.exists() else "(no output yet)"
                raise RuntimeError(f"job {job_id} still {fields.get('JobState')} after {timeout:g} s:\n{tail}")
            time.sleep(0.5)
