"""``python -m mpilm.cluster``: an emulated multi-node cluster on one machine, over real, shaped TCP links.

What it does:
- ``up --nodes K [--link RATE] [--cores-per-node C] [--slots-per-node S] [--oversubscribe]``:
  K network namespaces ``<cluster>-node<i>`` (hostnames ``node<i>``), each with its own share of
  this process's CPU affinity mask, joined through a bridge that lives in a namespace of its own
  (``<cluster>-sw``), so nothing of the machine's own network is touched. Every node's link is
  shaped with ``tc tbf`` at RATE in both directions (node -> switch on the node's ``eth0``,
  switch -> node on the switch port). Names resolve through ``/etc/netns/<namespace>/hosts``,
  which ``ip netns exec`` bind-mounts over ``/etc/hosts`` (the machine's own file is never edited).
  Hostfiles in Hydra (``node0:S``) and Open MPI (``node0 slots=S``) syntax go into the state
  directory. A second ``up`` replaces the first.
- ``run [-np N] [--ppn k] -- CMD...``: launches CMD on the nodes through the venv's MPICH Hydra
  (``mpiexec`` itself runs inside node 0, as Hydra forks the first node's ranks itself; the other
  nodes are reached through an ``ssh`` shim that enters their namespace, hostname and CPU set).
  Its exit status is the job's. ``UCX_TLS=tcp,self`` and ``UCX_NET_DEVICES=eth0`` are set unless
  given, because UCX would otherwise carry traffic between namespaces of one machine through
  shared memory, off the shaped link; ranks within one node keep MPICH's own shared memory.
- ``exec NODE -- CMD...``: one command on one node, with the ``ssh`` shim first on ``PATH`` and
  ``MPILM_HOSTFILE`` / ``MPILM_HOSTFILE_OPENMPI`` set, so unchanged batch scripts
  (``mpiexec -f hostfile``, Open MPI's ``mpirun --hostfile``) reach the other nodes.
- ``down`` removes everything ``up`` made (namespaces and their links, the bridge, the hosts
  files, the state), also after a crash; running it twice is fine. ``status`` shows nodes, link
  rates and state, CPU sets and live processes per node.
- Faults, also while a job runs: ``link NODE down|up``, ``link NODE --rate R``, ``kill NODE``
  (SIGKILL every process in the node's namespace), ``stop NODE`` / ``cont NODE`` (SIGSTOP /
  SIGCONT: a stalled node).

What it does not: emulate latency or loss. This kernel has ``tbf`` and ``htb`` but not
``netem``, so links differ only in rate; the round trip is that of a veth pair through a bridge
(tens of microseconds). It imports nothing of training, and it does not start MPI itself.

Limits: needs root (network, UTS and mount namespaces) and ``ip``, ``tc``, ``unshare`` and
``taskset``; without them it says what is missing and exits 2. At most 200 nodes. Several
clusters can coexist under different names (``MPILM_CLUSTER``, default ``mpilm``); the tests use
their own. Shaping uses a token bucket with a burst of 10 ms of the link rate (at least 64 KiB,
so that a TSO super-packet passes), so a short transfer can briefly exceed the rate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

SUBNET = "10.213.0"  # inside the cluster's own namespaces only: node i is .(i+1)
NODE_IFACE = "eth0"
MAX_NODES = 200
TOOLS = ("ip", "tc", "unshare", "taskset")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|kibit|mibit|gibit|tibit|"
                   r"bps|kbps|mbps|gbps|tbps|kibps|mibps|gibps|tibps)$", re.IGNORECASE)
_UNIT_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
              "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40}


class ClusterError(Exception):
    """A usage error: printed as ``error: ...``, exit status 2."""


# ---------------------------------------------------------------- pure helpers (unit-tested)
def rate_bits(rate: str) -> float:
    """Bits per second of a tc rate (``100mbit``, ``1gbit``, ``125mbps``); ClusterError if not one."""
    m = _RATE.match(rate.strip())
    if not m:
        raise ClusterError(f"--link {rate}: not a tc rate; use a number and a unit, e.g. 100mbit, 1gbit, 10gbit")
    value, unit = float(m.group(1)), m.group(2).lower()
    bits = value * (_UNIT_BITS[unit] if unit in _UNIT_BITS else 8 * _UNIT_BITS[unit.replace("bps", "bit")])
    if bits <= 0:
        raise ClusterError(f"--link {rate}: the rate must be above zero")
    return bits


def burst_bytes(bits_per_s: float) -> int:
    """tbf bucket: 10 ms of the rate, at least 64 KiB (a GSO/TSO packet must fit in one bucket).

    So a message shorter than the bucket crosses an idle link at memory speed (1.25 MB at
    1 Gbit/s): busbw above the link rate at small sizes is the bucket, not a fault. A 1 ms bucket
    was tried: the link then stayed below its rate (0.82-0.89 of it at 4-16 MiB, and MPI's own
    allreduce at 0.61), because the kernel refills the bucket too coarsely."""
    return max(64 << 10, int(bits_per_s / 8 / 100))


def split_cores(mask: list[int], nodes: int, cores_per_node: int | None, oversubscribe: bool) -> list[list[int]]:
    """Each node's CPU set: consecutive cores of ``mask``, wrapping only when oversubscribing."""
    if cores_per_node is None:
        cores_per_node = max(1, len(mask) // nodes)
    if cores_per_node < 1:
        raise ClusterError(f"--cores-per-node {cores_per_node}: must be >= 1")
    if nodes * cores_per_node > len(mask) and not oversubscribe:
        raise ClusterError(
            f"{nodes} nodes x {cores_per_node} cores need {nodes * cores_per_node} cores, and this process may "
            f"use {len(mask)} ({compact(mask)}); use fewer nodes or cores, or --oversubscribe to share cores")
    return [[mask[(i * cores_per_node + j) % len(mask)] for j in range(cores_per_node)] for i in range(nodes)]


def compact(cores: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (taskset's list syntax)."""
    out, cores = [], sorted(set(cores))
    i = 0
    while i < len(cores):
        j = i
        while j + 1 < len(cores) and cores[j + 1] == cores[j] + 1:
            j += 1
        out.append(str(cores[i]) if i == j else f"{cores[i]}-{cores[j]}")
        i = j + 1
    return ",".join(out)


def parse_ssh(argv: list[str]) -> tuple[str, str]:
    """``(host, remote command)`` from an ssh command line, as OpenSSH reads it.

    Options are skipped (those that take a value skip it too); the remote command is the remaining
    words joined by spaces, which the remote shell parses (what real ssh does, and what Hydra and
    Open MPI quote for).
    """
    with_value = set("BbcDEeFIiJLlmOoPpQRSWw")
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            break
        if not word.startswith("-") or word == "-":
            break
        letters = word[1:]
        for k, letter in enumerate(letters):
            if letter in with_value:
                if k == len(letters) - 1:
                    i += 1  # the value is the next word
                break
        i += 1
    if i >= len(argv):
        raise ClusterError("ssh shim: no host given")
    host = argv[i].rsplit("@", 1)[-1]
    command = " ".join(argv[i + 1:])
    if not command.strip():
        raise ClusterError(f"ssh shim: no command for {host}: the emulated nodes run commands, not login shells")
    return host, command


# ---------------------------------------------------------------- state
@dataclass
class Node:
    name: str      # hostname inside the node, and its name in hostfiles
    netns: str     # network namespace
    ip: str
    port: str      # the node's port on the bridge (switch side of its veth pair)
    cores: list[int]
    slots: int


@dataclass
class Cluster:
    name: str
    rate: str
    nodes: list[Node]

    @property
    def switch(self) -> str:
        return f"{self.name}-sw"

    def node(self, ref: str) -> Node:
        """A node by hostname (``node1``), index (``1``), namespace or address."""
        for i, node in enumerate(self.nodes):
            if ref in (node.name, node.netns, node.ip, str(i)):
                return node
        raise ClusterError(f"no node {ref!r} in cluster {self.name!r} (nodes: {', '.join(n.name for n in self.nodes)})")


def cluster_name() -> str:
    name = os.environ.get("MPILM_CLUSTER", "mpilm").strip() or "mpilm"
    if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", name):
        raise ClusterError(f"MPILM_CLUSTER={name!r}: use 1-12 lower-case letters and digits, starting with a letter")
    return name


def state_dir(name: str) -> Path:
    return Path(os.environ.get("MPILM_CLUSTER_STATE", "/run/mpilm-cluster")) / name


def hosts_dir(netns: str) -> Path:
    return Path("/etc/netns") / netns


def load(name: str) -> Cluster:
    path = state_dir(name) / "cluster.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterError(f"no cluster {name!r} is up: start one with python -m mpilm.cluster up --nodes 2") from None
    except (OSError, ValueError) as err:
        raise ClusterError(f"{path}: unreadable cluster state ({err}); run python -m mpilm.cluster down") from None
    cluster = Cluster(data["name"], data["rate"], [Node(**node) for node in data["nodes"]])
    missing = [n.netns for n in cluster.nodes if n.netns not in live_namespaces()]
    if missing:
        raise ClusterError(f"cluster {name!r} is broken (namespaces gone: {', '.join(missing)}); "
                           "run python -m mpilm.cluster down, then up again")
    return cluster


# ---------------------------------------------------------------- system calls
def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run one system command (ip, tc, ...); ClusterError with its own message when it fails."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ClusterError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit status {done.returncode}'}")
    return done


def need_root() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise ClusterError(f"python -m mpilm.cluster needs {', '.join(missing)} on PATH "
                           "(Debian: apt-get install iproute2 util-linux)")
    if os.geteuid() != 0:
        raise ClusterError("python -m mpilm.cluster needs root (it makes network, UTS and mount namespaces); "
                           "run it as root or under sudo")


def live_namespaces() -> set[str]:
    done = sh("ip", "netns", "list", check=False)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


def namespace_pids(netns: str) -> list[int]:
    done = sh("ip", "netns", "pids", netns, check=False)
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def shape(netns: str, dev: str, rate: str, verb: str = "replace") -> None:
    bits = rate_bits(rate)
    sh("tc", "-n", netns, "qdisc", verb, "dev", dev, "root", "tbf", "rate", rate,
       "burst", str(burst_bytes(bits)), "latency", "50ms")


# ---------------------------------------------------------------- commands
def up(args) -> None:
    name = cluster_name()
    rate_bits(args.link)  # usage errors before anything is made
    if not 2 <= args.nodes <= MAX_NODES:
        raise ClusterError(f"--nodes {args.nodes}: a cluster has 2 to {MAX_NODES} nodes")
    mask = sorted(os.sched_getaffinity(0))
    cpusets = split_cores(mask, args.nodes, args.cores_per_node, args.oversubscribe)
    slots = args.slots_per_node or len(cpusets[0])
    if slots < 1:
        raise ClusterError(f"--slots-per-node {slots}: must be >= 1")
    need_root()
    down_cluster(name, quiet=True)  # a second up replaces the first
    nodes = [Node(f"node{i}", f"{name}-node{i}", f"{SUBNET}.{i + 1}", f"p{i}", cpusets[i], slots)
             for i in range(args.nodes)]
    cluster = Cluster(name, args.link, nodes)
    try:
        _build(cluster)
    except BaseException:
        down_cluster(name, quiet=True)  # never leave half a cluster behind
        raise
    print(f"cluster {name}: {len(nodes)} nodes, {args.link} links, hostfiles in {state_dir(name)}")
    status_print(cluster)


def _build(cluster: Cluster) -> None:
    sw = cluster.switch
    sh("ip", "netns", "add", sw)
    sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", sw, "link", "set", "br0", "up")
    hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost\n" + "".join(f"{n.ip}\t{n.name}\n" for n in cluster.nodes)
    for node in cluster.nodes:
        sh("ip", "netns", "add", node.netns)
        sh("ip", "-n", sw, "link", "add", node.port, "type", "veth", "peer", "name", NODE_IFACE, "netns", node.netns)
        sh("ip", "-n", sw, "link", "set", node.port, "master", "br0")
        sh("ip", "-n", sw, "link", "set", node.port, "up")
        sh("ip", "-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", NODE_IFACE)
        sh("ip", "-n", node.netns, "link", "set", NODE_IFACE, "up")
        sh("ip", "-n", node.netns, "link", "set", "lo", "up")
        shape(node.netns, NODE_IFACE, cluster.rate)   # node -> switch
        shape(sw, node.port, cluster.rate)            # switch -> node
        hosts_dir(node.netns).mkdir(parents=True, exist_ok=True)
        (hosts_dir(node.netns) / "hosts").write_text(hosts)
    state = state_dir(cluster.name)
    (state / "bin").mkdir(parents=True, exist_ok=True)
    (state / "hostfile").write_text("".join(f"{n.name}:{n.slots}\n" for n in cluster.nodes))
    (state / "hostfile.openmpi").write_text("".join(f"{n.name} slots={n.slots}\n" for n in cluster.nodes))
    shim = state / "bin" / "ssh"
    package_root = Path(__file__).resolve().parents[1]
    shim.write_text("#!/bin/sh\n# ssh for the emulated nodes of `python -m mpilm.cluster`: enters the node, runs the command\n"
                    f"MPILM_CLUSTER={cluster.name} PYTHONPATH={shlex.quote(str(package_root))}${{PYTHONPATH:+:$PYTHONPATH}} "
                    f"exec {shlex.quote(sys.executable)} -m mpilm.cluster ssh \"$@\"\n")
    shim.chmod(0o755)
    (state / "cluster.json").write_text(json.dumps(asdict(cluster), indent=1) + "\n")


def down_cluster(name: str, quiet: bool = False) -> list[str]:
    """Remove every namespace, hosts file and state file of cluster ``name``; returns what went."""
    removed = []
    prefix = f"{name}-"
    for netns in sorted(live_namespaces()):
        if not netns.startswith(prefix):
            continue
        for pid in namespace_pids(netns):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        sh("ip", "netns", "del", netns, check=False)  # takes its veth ends (and the bridge) with it
        removed.append(netns)
    for path in Path("/etc/netns").glob(f"{prefix}*") if Path("/etc/netns").is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(state_dir(name), ignore_errors=True)
    if not quiet:
        print(f"cluster {name}: " + (f"removed {', '.join(removed)}" if removed else "nothing to remove"))
    return removed


def down(args) -> None:
    need_root()
    down_cluster(cluster_name())


def status_print(cluster: Cluster) -> None:
    links = sh("ip", "-n", cluster.switch, "-o", "link", "show", check=False).stdout
    rows = [("node", "address", "cores", "slots", "link", "processes")]
    for node in cluster.nodes:
        qdisc = sh("tc", "-n", node.netns, "qdisc", "show", "dev", NODE_IFACE, check=False).stdout
        rate = re.search(r"rate (\S+)", qdisc)
        port_line = next((line for line in links.splitlines() if f" {node.port}@" in line), "")
        state = "down" if "state DOWN" in port_line or "LOWERLAYERDOWN" in port_line else "up"
        pids = namespace_pids(node.netns)
        names = sorted({_comm(pid) for pid in pids} - {""})
        procs = f"{len(pids)}" + (f" ({', '.join(names)})" if names else "")
        rows.append((node.name, node.ip, compact(node.cores), str(node.slots),
                     f"{rate.group(1) if rate else '?'} {state}", procs))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def status(args) -> None:
    need_root()
    status_print(load(cluster_name()))


def node_argv(cluster: Cluster, node: Node, argv: list[str]) -> list[str]:
    """``argv`` run inside ``node``: its network namespace, its own hostname, its CPU set."""
    enter = 'hostname "$1" && cpus="$2" && shift 2 && exec taskset -c "$cpus" "$@"'
    return ["ip", "netns", "exec", node.netns, "unshare", "--uts", "--", "sh", "-c", enter, "sh",
            node.name, compact(node.cores), *argv]


def node_env(cluster: Cluster) -> dict[str, str]:
    """The environment of commands on the nodes: the ssh shim first on PATH, UCX on the link."""
    state = state_dir(cluster.name)
    env = dict(os.environ)
    env["PATH"] = f"{state / 'bin'}:{env.get('PATH', '')}"
    env["MPILM_CLUSTER"] = cluster.name
    env["MPILM_HOSTFILE"] = str(state / "hostfile")
    env["MPILM_HOSTFILE_OPENMPI"] = str(state / "hostfile.openmpi")
    # without this UCX moves data between namespaces of one machine through shared memory,
    # which never touches the shaped link; within a node MPICH's own shared memory still applies
    env.setdefault("UCX_TLS", "tcp,self")
    env.setdefault("UCX_NET_DEVICES", NODE_IFACE)
    return env


def launch_plan(cluster: Cluster, np: int | None, ppn: int | None) -> tuple[int, int | None]:
    """``(ranks, ranks per node or None for Hydra's fill-by-slots)``; ClusterError past the slots."""
    slots = cluster.nodes[0].slots
    total = slots * len(cluster.nodes)
    if ppn is not None:
        if ppn < 1:
            raise ClusterError(f"--ppn {ppn}: must be >= 1")
        if ppn > slots:
            raise ClusterError(f"--ppn {ppn}: each node has {slots} slot(s); "
                               f"bring the cluster up with --slots-per-node {ppn} to place more ranks per node")
        np = ppn * len(cluster.nodes) if np is None else np
        total = ppn * len(cluster.nodes)
    np = total if np is None else np
    if np < 1:
        raise ClusterError(f"-np {np}: must be >= 1")
    if np > total:
        raise ClusterError(f"-np {np}: the cluster has {total} slot(s) ({len(cluster.nodes)} nodes x "
                           f"{ppn or slots}); use fewer ranks, or up --slots-per-node to allow more per node")
    return np, ppn


def run(args) -> None:
    command = _command(args.command, "run")
    need_root()
    cluster = load(cluster_name())
    np, ppn = launch_plan(cluster, args.np, args.ppn)
    state = state_dir(cluster.name)
    mpiexec = args.mpiexec or str(Path(sys.executable).parent / "mpiexec")
    if not os.access(mpiexec, os.X_OK):
        raise ClusterError(f"--mpiexec {mpiexec}: not an executable (the venv's MPICH provides one: make install)")
    argv = [mpiexec, "-launcher", "ssh", "-launcher-exec", str(state / "bin" / "ssh"),
            "-f", str(state / "hostfile"), "-iface", NODE_IFACE, "-np", str(np)]
    if ppn is not None:
        argv += ["-ppn", str(ppn)]
    # Hydra forks the first node's ranks itself, so mpiexec must run inside node 0
    sys.stdout.flush()
    os.execvpe("ip", node_argv(cluster, cluster.nodes[0], argv + command), node_env(cluster))


def exec_on(args) -> None:
    command = _command(args.command, "exec")
    need_root()
    cluster = load(cluster_name())
    node = cluster.node(args.node)
    sys.stdout.flush()
    os.execvpe("ip", node_argv(cluster, node, command), node_env(cluster))


def ssh(words: list[str]) -> None:
    """The shim Hydra and Open MPI call as ``ssh [options] HOST COMMAND``."""
    host, command = parse_ssh(words)
    cluster = load(cluster_name())
    try:
        node = cluster.node(host)
    except ClusterError:
        print(f"ssh: Could not resolve hostname {host}: not a node of cluster {cluster.name}", file=sys.stderr)
        sys.exit(255)
    os.execvpe("ip", node_argv(cluster, node, ["sh", "-c", command]), node_env(cluster))


def link(args) -> None:
    need_root()
    cluster = load(cluster_name())
    node = cluster.node(args.node)
    if args.rate is not None:
        if args.state is not None:
            raise ClusterError("link: give either up/down or --rate, not both")
        rate_bits(args.rate)
        shape(node.netns, NODE_IFACE, args.rate, "change")
        shape(cluster.switch, node.port, args.rate, "change")
        print(f"{node.name}: link rate {args.rate}")
    elif args.state in ("up", "down"):
        # the switch side goes down: a pulled cable, the node's own address and routes stay
        sh("ip", "-n", cluster.switch, "link", "set", node.port, args.state)
        print(f"{node.name}: link {args.state}")
    else:
        raise ClusterError("link NODE: say up, down or --rate RATE")


def signal_node(args) -> None:
    need_root()
    cluster = load(cluster_name())
    node = cluster.node(args.node)
    sig = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "cont": signal.SIGCONT}[args.action]
    pids = namespace_pids(node.netns)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    print(f"{node.name}: {sig.name} to {len(pids)} process(es)")


def _command(words: list[str], verb: str) -> list[str]:
    words = words[1:] if words and words[0] == "--" else words
    if not words:
        raise ClusterError(f"{verb}: no command given (e.g. python -m mpilm.cluster {verb} -- hostname)")
    return words


# ---------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage errors follow the project's policy too
        raise ClusterError(message)


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="python -m mpilm.cluster", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    p = sub.add_parser("up", help="start (or replace) an emulated cluster")
    p.add_argument("--nodes", type=int, required=True, help="number of emulated nodes (>= 2)")
    p.add_argument("--link", default="1gbit", help="tc rate of every node's link, both directions (default 1gbit)")
    p.add_argument("--cores-per-node", type=int, help="cores of this process's affinity mask per node (default: split evenly)")
    p.add_argument("--slots-per-node", type=int, help="ranks a node takes in the hostfile (default: its cores)")
    p.add_argument("--oversubscribe", action="store_true", help="let nodes share cores when there are too few")
    p.set_defaults(fn=up)
    p = sub.add_parser("down", help="remove everything up made (safe to repeat)")
    p.set_defaults(fn=down)
    p = sub.add_parser("status", help="nodes, link rates, CPU sets, live processes")
    p.set_defaults(fn=status)
    p = sub.add_parser("run", help="launch an MPI job on the nodes through Hydra: run [-np N] [--ppn k] -- CMD...")
    p.add_argument("-np", "-n", dest="np", type=int, help="ranks (default: every slot)")
    p.add_argument("--ppn", type=int, help="ranks per node (default: fill nodes by slots)")
    p.add_argument("--mpiexec", help="the Hydra mpiexec to use (default: the one beside this python)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every rank runs")
    p.set_defaults(fn=run)
    p = sub.add_parser("exec", help="run one command on one node: exec NODE -- CMD...")
    p.add_argument("node")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(fn=exec_on)
    p = sub.add_parser("link", help="link NODE up|down, or link NODE --rate RATE (while a job runs)")
    p.add_argument("node")
    p.add_argument("state", nargs="?", choices=("up", "down"))
    p.add_argument("--rate")
    p.set_defaults(fn=link)
    for action, text in (("kill", "SIGKILL"), ("stop", "SIGSTOP (a stalled node)"), ("cont", "SIGCONT")):
        p = sub.add_parser(action, help=f"{text} every process of NODE")
        p.add_argument("node")
        p.set_defaults(fn=signal_node, action=action)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["ssh"]:  # the shim's entry point: ssh's own options, not argparse's
            ssh(argv[1:])
            return 0
        args = parser().parse_args(argv)
        args.fn(args)
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
