"""Fuzz the command line: odd option values and odd corpora end as a run or as one `error:` line.

Options: seeded random choices of ``TrainConfig``'s fields (read from the dataclass, so a new
option is fuzzed the day it is added) with odd values (negative, zero, huge, nan, inf, empty,
non-numeric, wrong names, line breaks), on the command line and in ``--config`` files, through
``config.parse`` in this process: the parser and validator every rank of ``mpilm.train`` runs
first, fast enough for hundreds of cases. Each case must give a checked config or a one-line
``UsageError``; anything else is a bug.

Corpora: real launches of ``mpilm.train`` at one rank on random bytes, a symlink loop, a FIFO, one
3 MB line, a directory of binary files with a FIFO and symlink cycles in it, and (when not root)
unreadable files: each ends within its timeout with a run (rc 0) or one `error:` line (rc 2),
never a traceback, never a hang.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

import pytest

from conftest import run_cli
from mpilm import config
from mpilm.errors import UsageError

FIELDS = dataclasses.fields(config.TrainConfig)
NUMBERS = ["0", "-1", "-0", "-0.1", "1.5", "1e-320", "1e400", "-1e400", "nan", "inf", "-inf", str(2**63),
           str(-2**70), "9" * 40, "", " ", "abc", "0x10", "1_0", "1e3", "a\nb", "--", "½"]
TEXTS = ["", " ", "-", "auto", "~no-such-user-mpilm/x", "/nonexistent/x", "a\nb", "é" * 3, "x" * 5000]
TOML_VALUES = ["0", "-1", "1.5", "nan", "inf", "-inf", "9223372036854775807", "-9223372036854775808",
               "18446744073709551616", '""', '"bogus"', '"a\\nb"', '"\\u0000"', '"~no-such-user-mpilm"', "true",
               "false", "[1, 2]", "{ a = 1 }", "1979-05-27T07:32:00Z"]
TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "2", "--steps", "2",
        "--eval-batches", "1", "--log-every", "1"]


def flag(f) -> str:
    return "--" + f.name.replace("_", "-")


def odd_values(f) -> list[str]:
    """Values to try for field ``f``: its default and valid names (so combinations get checked too),
    and odd ones of its kind."""
    choices = f.metadata["choices"]
    if choices:
        first = str(choices[0])
        return [*map(str, choices), "bogus", first.upper(), f" {first}", "", "-1", "nan"]
    if config._type_of(f) in (int, float):
        return [str(f.default), *NUMBERS]
    return TEXTS


def random_argv(rng: random.Random) -> list[str]:
    argv = []
    for f in rng.sample(FIELDS, rng.randint(1, 4)):
        if config._type_of(f) is bool:
            argv.append(rng.choice([flag(f), "--no-" + flag(f)[2:], flag(f) + "=yes"]))
            continue
        value = rng.choice(odd_values(f))
        argv += [flag(f), value] if rng.random() < 0.8 else [f"{flag(f)}={value}"]
    if rng.random() < 0.05:
        argv.insert(rng.randrange(len(argv) + 1), rng.choice(["--no-such-option", "--st", "-x", "--", "extra"]))
    return argv


def random_toml(rng: random.Random) -> str:
    lines = []
    for f in rng.sample(FIELDS, rng.randint(1, 4)):
        key = rng.choice([f.name, f.name.replace("_", "-")])
        valid = json.dumps(f.default) if isinstance(f.default, (bool, int, float, str)) else '"x"'
        lines.append(f"{key} = {rng.choice([valid, *TOML_VALUES])}")
    if rng.random() < 0.05:
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(["no-such-option = 1", "[table]", "= 1", "steps ="]))
    return "\n".join(lines) + "\n"


def parse_outcome(argv: list[str]) -> str:
    """'ok' or 'error', and only those: a one-line UsageError or a config that passes check again."""
    try:
        cfg = config.parse(argv, quiet=True)
    except UsageError as err:
        message = str(err)
        assert message and "\n" not in message and "\r" not in message, (argv, message)
        return "error"
    assert isinstance(cfg, config.TrainConfig) and config.check(cfg) is cfg, argv
    return "ok"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_option_values_parse_or_give_one_usage_error(seed):
    rng = random.Random(seed)
    outcomes = []
    for _ in range(400):
        argv = random_argv(rng)
        try:
            outcomes.append(parse_outcome(argv))
        except AssertionError:
            raise
        except BaseException as err:  # noqa: BLE001 - the point: nothing but UsageError may escape
            pytest.fail(f"config.parse({argv!r}) raised {type(err).__name__}: {err}")
    # both kinds of outcome happen: the fuzz neither accepts nor rejects everything
    assert outcomes.count("ok") >= 20 and outcomes.count("error") >= 200, (outcomes.count("ok"), outcomes.count("error"))


def test_random_config_files_parse_or_give_one_usage_error(tmp_path):
    rng = random.Random(7)
    path = tmp_path / "run.toml"
    for _ in range(300):
        text = random_toml(rng)
        path.write_text(text)
        try:
            parse_outcome(["--config", str(path)])
        except AssertionError:
            raise
        except BaseException as err:  # noqa: BLE001
            pytest.fail(f"--config file {text!r} raised {type(err).__name__}: {err}")


def test_odd_config_files_give_one_usage_error(tmp_path):
    (tmp_path / "random.toml").write_bytes(random.Random(3).randbytes(4096))
    (tmp_path / "empty.toml").write_bytes(b"")
    (tmp_path / "dir.toml").mkdir()
    os.mkfifo(tmp_path / "fifo.toml")  # opening it to read would block: it must not be opened
    os.symlink(tmp_path / "loop-b.toml", tmp_path / "loop-a.toml")
    os.symlink(tmp_path / "loop-a.toml", tmp_path / "loop-b.toml")
    assert parse_outcome(["--config", str(tmp_path / "empty.toml")]) == "ok"  # an empty table: the defaults
    for name in ("random.toml", "dir.toml", "fifo.toml", "loop-a.toml"):
        assert parse_outcome(["--config", str(tmp_path / name)]) == "error", name


def assert_clean(result) -> None:
    """rc 0, or rc 2 with exactly one `error:` line; never a traceback, never the outer timeout."""
    assert result.returncode in (0, 2), (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]
    if result.returncode == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, result.stderr[-3000:]


@pytest.fixture(scope="module")
def odd_corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd-corpora")
    rng = random.Random(11)
    (root / "random.bin").write_bytes(rng.randbytes(300_000))
    os.symlink(root / "loop-b", root / "loop-a")
    os.symlink(root / "loop-a", root / "loop-b")
    os.mkfifo(root / "fifo")
    (root / "one-line.txt").write_bytes(b"a" * 3_000_000)  # 3 MB and no line break
    binaries = root / "binaries"
    (binaries / "sub").mkdir(parents=True)
    for i in range(3):
        (binaries / f"blob{i}.bin").write_bytes(rng.randbytes(100_000))
    (binaries / "empty").write_bytes(b"")
    os.mkfifo(binaries / "pipe")
    os.symlink(root / "loop-a", binaries / "loop")
    os.symlink("..", binaries / "sub" / "up")  # a directory cycle
    if os.geteuid() != 0:
        unreadable = root / "unreadable"
        unreadable.mkdir()
        for i in range(2):
            (unreadable / f"secret{i}.txt").write_text("x" * 50_000)
            (unreadable / f"secret{i}.txt").chmod(0)
    return root


@pytest.mark.parametrize("name, expected_rc, needle", [
    ("random.bin", 0, ""),
    ("loop-a", 2, "no such file or directory"),
    ("fifo", 2, "no files to read"),
    ("one-line.txt", 0, ""),
    ("binaries", 0, ""),
    pytest.param("unreadable", 2, "cannot read", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root reads every file: no unreadable corpus to make")),
])
def test_odd_corpora_run_or_give_one_usage_error(odd_corpora, tmp_path, name, expected_rc, needle):
    args = ["-m", "mpilm.train", *TINY, "--data", str(odd_corpora / name), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out")]
    # the pure-torch kernels: these runs are about the corpus, not about waiting on the shared C++ build lock
    result = run_cli(args, np=1, timeout=90, env={"MPILM_KERNELS": "torch"})
    assert_clean(result)
    assert result.returncode == expected_rc, result.stderr[-3000:]
    assert needle in result.stderr
