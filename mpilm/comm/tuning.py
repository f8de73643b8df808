"""The thresholds behind ``allreduce(algorithm="auto")``: built-in ones, or measured ones from JSON.

``python -m mpilm.bench allreduce --tune`` times every candidate algorithm per message size and
writes the winners as *rules* (``[[max_bytes, algorithm], ..., [null, algorithm]]``: the first
rule whose ``max_bytes`` is >= the message size applies) into a small JSON file, one entry per
(world size, ranks per node, dtype). ``auto`` reads that file, else falls back to the built-in
rules of ``builtin_rules``.

Which file: the ``tuning_file`` argument, else the path given to ``use_file`` (the bench's
``--tuning-file``), else ``$MPILM_TUNING``, else ``~/.cache/mpilm/allreduce-tuning.json``.

Every rank must choose the same algorithm, so only rank 0 of a communicator reads the file and
broadcasts the rules that apply (once per communicator and file, cached on the communicator as an
MPI attribute); the key uses the largest ranks-per-node of the communicator, which all ranks
agree on. A missing file means built-ins, silently; an unreadable or malformed one makes rank 0
warn once on stderr and use built-ins: a tuning file never stops a run.

The halves (``reduce_scatter`` / ``allgather`` with ``auto``) follow the same rules by the size
of the whole buffer (``choose_halves``): a choice without halves (``tree``) becomes ``rhd`` or
``ring`` by size (``halves_for``).

Limits: an entry measured for float32 also serves other dtypes by byte size when there is no
entry for them. The file is read once per communicator: an edit (or a new ``$MPILM_TUNING``)
takes effect after ``forget()``, which every rank must call at the same point (it re-triggers
the collective load).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import sys
from pathlib import Path

import torch
from mpi4py import MPI

from mpilm.comm import common, world

FORMAT = "mpilm-allreduce-tuning"
VERSION = 1
DEFAULT_PATH = Path("~/.cache/mpilm/allreduce-tuning.json")
CHOOSABLE = common.CHOOSABLE  # what a tuning file may name (everything allreduce accepts but "auto")

KIB = 1 << 10

_explicit_path: Path | None = None
_generation = 0
_warned: set[str] = set()
# choices for the default file by (communicator handle, bytes, dtype): the whole cost of ``auto``
# on a small message is this lookup. Entries leave with their communicator (delete callback of
# the attribute that marks a communicator as cached) and on ``forget()``, so a handle that MPI
# reuses for a new communicator never sees an old choice.
_fast: dict[tuple, str] = {}


def _drop_comm(comm: MPI.Comm, keyval: int, state) -> None:
    handle = comm.py2f()
    for key in [key for key in list(_fast) if key[0] == handle]:  # list(): another thread may insert
        _fast.pop(key, None)


_CACHE_KEYVAL = MPI.Comm.Create_keyval(delete_fn=_drop_comm)


class TuningFileError(ValueError):
    """A tuning file that exists but cannot be used."""


def builtin_rules(world_size: int, ranks_per_node: int | None = None) -> list[list]:
    """Rules used without a tuning file.

    All ranks on one node (``ranks_per_node == world_size``): ``shm`` at every size. Its C++
    path beats MPICH's own allreduce from 1 KiB up at -np 2 here, 1.3-4.6x with the message in the
    shared window (as training allocates it) and 0.9-1.7x with a private buffer copied in
    (``docs/figures/allreduce-shm*-np2.json``); GPU buffers, which shm cannot map, go to the ring.

    Several nodes (or unknown): alpha-beta reasoning, checked on the -np 2 sweep in
    ``docs/figures/allreduce-np2.json``. Small messages are latency-bound: recursive doubling
    (``tree``, lg p steps, one blocking exchange each). Above that at power-of-two sizes
    Rabenseifner (``rhd``): bandwidth-optimal with 2 lg p steps. At other sizes its fold-in sends
    the whole vector twice more on some ranks, which costs more than the ring's extra latency
    steps, so the ring takes over.

    Several nodes with more than one rank on some node: ``tree`` up to 256 KiB, ``hier`` above.
    On the emulated cluster (2 nodes x 2 ranks, 1 Gbit/s links, ``python -m mpilm.cluster``)
    hier moved each byte across the link once per node instead of once per rank: 1.02x MPI at
    1 MiB and 1.34x at 16 MiB, while below 64 KiB its three stages cost 2-3x tree's latency.
    """
    if ranks_per_node is not None and ranks_per_node == world_size:
        return [[None, "shm"]]
    if ranks_per_node is not None and ranks_per_node > 1:
        return [[256 * KIB, "tree"], [None, "hier"]]
    power_of_two = world_size & (world_size - 1) == 0
    return [[64 * KIB, "tree"], [None, "rhd" if power_of_two else "ring"]]


def use_file(path: str | os.PathLike | None) -> None:
    """Make ``auto`` read ``path`` from now on (``None``: back to ``$MPILM_TUNING`` / default)."""
    global _explicit_path
    _explicit_path = Path(path).expanduser() if path is not None else None
    forget()


def forget() -> None:
    """Drop the cached rules of every communicator (call on all ranks, e.g. after a re-tune)."""
    global _generation
    _generation += 1
    _fast.clear()


def tuning_path(tuning_file: str | os.PathLike | None = None) -> Path:
    if tuning_file is not None:
        return Path(tuning_file).expanduser()
    if _explicit_path is not None:
        return _explicit_path
    return _env_path(os.environ.get("MPILM_TUNING", "").strip())


@functools.lru_cache(maxsize=8)
def _env_path(env: str) -> Path:
    return Path(env).expanduser() if env else DEFAULT_PATH.expanduser()


def ranks_per_node(comm: MPI.Comm) -> int:
    """The largest number of ``comm``'s ranks on one node: equal on every rank. Collective."""
    local = world.node_comm(comm).Get_size()
    return comm.allreduce(local, op=MPI.MAX)  # cold path (once per communicator): pickle is fine


def entry_key(world_size: int, rpn: int, dtype: str) -> str:
    return f"np{world_size}-rpn{rpn}-{dtype}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _validate_rules(rules, where: str) -> list[list]:
    if not isinstance(rules, list) or not rules:
        raise TuningFileError(f"{where}: 'rules' must be a non-empty list")
    previous = -1
    for i, rule in enumerate(rules):
        if not (isinstance(rule, list) and len(rule) == 2):
            raise TuningFileError(f"{where}: rule {i} must be [max_bytes, algorithm]")
        limit, algorithm = rule
        if algorithm not in CHOOSABLE:
            raise TuningFileError(f"{where}: rule {i}: unknown algorithm {algorithm!r}")
        last = i == len(rules) - 1
        if last and limit is not None:
            raise TuningFileError(f"{where}: the last rule must have max_bytes null (covers every size)")
        if not last and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= previous):
            raise TuningFileError(f"{where}: rule {i}: max_bytes must be whole numbers, increasing")
        previous = limit if limit is not None else previous
    return [list(rule) for rule in rules]


def read_file(path: Path) -> dict:
    """The parsed, validated file: ``{"format", "version", "entries": {key: entry}}``.

    Raises FileNotFoundError when absent and TuningFileError when unusable.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise TuningFileError(f"cannot read: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TuningFileError(f"not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TuningFileError(f"not an mpilm tuning file (expected \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise TuningFileError(f"version {data.get('version')!r}, this mpilm reads version {VERSION}")
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise TuningFileError("'entries' must be an object")
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            raise TuningFileError(f"entry {key}: must be an object")
        entry["rules"] = _validate_rules(entry.get("rules"), f"entry {key}")
    return data


def _rules_for(path: Path, world_size: int, rpn: int) -> tuple[dict[str, list], str | None]:
    """``({dtype: rules}, problem)`` for this (world size, ranks per node); rank 0 only."""
    try:
        data = read_file(path)
    except FileNotFoundError:
        return {}, None
    except TuningFileError as err:
        return {}, str(err)
    prefix = entry_key(world_size, rpn, "")
    return {key[len(prefix):]: entry["rules"] for key, entry in data["entries"].items()
            if key.startswith(prefix)}, None


class _State:
    """One communicator's cache: rules per file (by dtype) and finished choices per size."""

    __slots__ = ("generation", "tables", "memo", "ranks_per_node")

    def __init__(self):
        self.generation = _generation
        self.tables: dict[Path, dict[str, list]] = {}
        self.memo: dict[tuple, str] = {}
        self.ranks_per_node: int | None = None  # set with the first table


def _state(comm: MPI.Comm) -> _State:
    state = comm.Get_attr(_CACHE_KEYVAL)
    if state is None or state.generation != _generation:
        state = _State()
        comm.Set_attr(_CACHE_KEYVAL, state)
    return state


def _table(comm: MPI.Comm, path: Path) -> dict[str, list]:
    """The rules of ``path`` that apply to ``comm`` by dtype, cached on it. Collective on a miss."""
    tables = _state(comm).tables
    table = tables.get(path)
    if table is not None:
        return table
    rpn = _state(comm).ranks_per_node = ranks_per_node(comm)
    table, problem = (_rules_for(path, comm.Get_size(), rpn) if comm.Get_rank() == 0 else (None, None))
    if problem and str(path) not in _warned:
        _warned.add(str(path))
        print(f"warning: allreduce tuning file {path}: {problem}; 'auto' uses built-in thresholds",
              file=sys.stderr, flush=True)
    table = tables[path] = comm.bcast(table, root=0)  # cold path (once per comm and file): blocks on rank 0's read
    return table


def rules(comm: MPI.Comm, dtype: torch.dtype = torch.float32, tuning_file=None) -> tuple[list[list], str]:
    """``(rules, source)`` that ``auto`` applies on ``comm`` for ``dtype``; source names the file
    entry or says ``built-in``. Collective on first use per communicator and file."""
    path = tuning_path(tuning_file)
    table = _table(comm, path)
    name = dtype_name(dtype)
    for candidate in (name, "float32", *sorted(table)):
        if candidate in table:
            return table[candidate], f"{path} [{candidate}]"
    return builtin_rules(comm.Get_size(), _state(comm).ranks_per_node), "built-in"


def pick(rules_list: list[list], nbytes: int) -> str:
    for limit, algorithm in rules_list:
        if limit is None or nbytes <= limit:
            return algorithm
    return rules_list[-1][1]


def choose(nbytes: int, comm: MPI.Comm, dtype: torch.dtype = torch.float32, tuning_file=None) -> str:
    """The algorithm ``auto`` runs for a message of ``nbytes`` bytes of ``dtype`` on ``comm``.

    Hot path (every ``auto`` call): one dict lookup once this size was seen on this communicator.
    """
    if tuning_file is None:
        algorithm = _fast.get((comm.py2f(), nbytes, dtype))
        if algorithm is not None:
            return algorithm
    state = _state(comm)
    key = (nbytes, dtype, tuning_file)
    algorithm = state.memo.get(key)
    if algorithm is None:
        if len(state.memo) >= 4096:  # bounded for callers that never repeat a size
            state.memo.clear()
        algorithm = state.memo[key] = pick(rules(comm, dtype, tuning_file)[0], nbytes)
    if tuning_file is None:
        if len(_fast) >= 4096:
            _fast.clear()
        _fast[(comm.py2f(), nbytes, dtype)] = algorithm
    return algorithm


HALVES = common.REDUCE_SCATTER_ALGORITHMS  # what the halves accept (``auto`` among them)
HALVES_RHD_UP_TO = 256 * KIB  # ``tree``'s sizes: latency-bound, where rhd's 2 lg p steps win


def halves_for(algorithm: str, nbytes: int, world_size: int) -> str:
    """The algorithm with a reduce-scatter and an allgather half that stands in for an allreduce
    choice: itself when it has halves, else (``tree``) ``rhd`` on latency-bound messages (up to
    ``HALVES_RHD_UP_TO``: lg p steps per half against the ring's p-1) and at power-of-two world
    sizes, ``ring`` for larger messages at other sizes (rhd's fold-in sends them twice more), as
    ``builtin_rules`` reasons for allreduce."""
    if algorithm in HALVES:
        return algorithm
    power_of_two = world_size & (world_size - 1) == 0
    return "rhd" if nbytes <= HALVES_RHD_UP_TO or power_of_two else "ring"


def choose_halves(nbytes: int, comm: MPI.Comm, dtype: torch.dtype = torch.float32, tuning_file=None) -> str:
    """What ``auto`` runs for a reduce-scatter or allgather of an ``nbytes`` buffer: the allreduce
    rules' choice (``choose``), mapped by ``halves_for`` to one that has the halves."""
    return halves_for(choose(nbytes, comm, dtype, tuning_file), nbytes, comm.Get_size())


def rules_from_timings(sizes: list[int], times: dict[str, list[float]]) -> list[list]:
    """Rules that pick, at every measured size, the algorithm with the smallest time.

    ``times[algorithm][i]`` is the time at ``sizes[i]`` (ascending). A switch between two measured
    sizes is placed at their geometric mean.
    """
    if not sizes or not times:
        raise ValueError("rules_from_timings: nothing measured")
    winners = [min(times, key=lambda name: times[name][i]) for i in range(len(sizes))]
    out: list[list] = []
    for i, winner in enumerate(winners):
        if i + 1 < len(sizes) and winners[i + 1] != winner:
            out.append([int((sizes[i] * sizes[i + 1]) ** 0.5), winner])
    out.append([None, winners[-1]])
    return out


def write_entry(path: Path, world_size: int, rpn: int, dtype: torch.dtype, rules_list: list[list],
                **facts) -> Path:
    """Merge one entry into ``path`` (atomically; an unusable old file is replaced). Rank 0 only."""
    _validate_rules(rules_list, "new entry")
    try:
        data = read_file(path)
    except (FileNotFoundError, TuningFileError):
        data = {"format": FORMAT, "version": VERSION, "entries": {}}
    data["entries"][entry_key(world_size, rpn, dtype_name(dtype))] = {
        "world_size": world_size,
        "ranks_per_node": rpn,
        "dtype": dtype_name(dtype),
        "rules": rules_list,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mpi_library": world.library_version(),
        **facts,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half of it
    return path
