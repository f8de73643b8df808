"""Every training option in one ``TrainConfig`` dataclass: its default, its help text, its check.

The command line (``argparse``) and the ``--config FILE.toml`` file are both generated from the
dataclass fields, so an option exists in exactly one place. Precedence: defaults < config file <
command line. ``parse(argv)`` returns a checked config or raises ``UsageError`` (the same on
every rank, since it only looks at argv and the file).

What it does not: no I/O beyond reading the TOML file; the choice lists of algorithms and
compressors are spelled out here (this module imports nothing of mpilm's); a test checks they
match what ``mpilm.comm`` implements.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpilm.errors import UsageError

ALLREDUCE_ALGORITHMS = ("auto", "ring", "rhd", "tree", "shm", "hier", "mpi")
MODELS = ("gpt", "lstm")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw", "sgd")
COMPRESSORS = ("none", "fp16", "bf16", "topk", "sign")
TOPK_AGGREGATES = ("allgather", "gtopk")
TOPK_ADAM = ("plain", "frozen", "precondition", "precondition-momentum")  # mpilm.optim.TOPK_ADAM
DATA_IO = ("scatter", "mpiio")
ZERO_STAGES = (0, 1)
SYNC_MODES = ("sync", "async", "local", "diloco")
# options that mean something only in one --sync mode
MODE_OPTIONS = {"local_steps": ("local", "diloco"), "local_average_optimizer": ("local",),
                "outer_lr": ("diloco",), "outer_momentum": ("diloco",), "outer_nesterov": ("diloco",),
                "momentum_correction": ("sync",), "topk_adam": ("sync",), "topk_adam_warmup": ("sync",),
                "max_staleness": ("async",), "staleness_lr": ("async",), "ps_ranks": ("async",), "async_pipeline": ("async",)}
# algorithms with a reduce-scatter and an allgather half (what --zero 1 needs)
SHARDED_ALGORITHMS = ("auto", "ring", "rhd", "shm", "hier", "mpi")
# measured on the emulated 2-node 1 Gbit/s cluster, overlap on: see README "Overlap"
BUCKET_MB_DEFAULT = 1.0
COMM_POLL_US_DEFAULT = 100.0


def opt(default: Any, help: str, *, choices=None, check=None, cli: str | None = None):
    """A config field: default, ``--help`` text, optional choices and a check (value -> error or None)."""
    meta = {"help": help, "choices": choices, "check": check, "cli": cli}
    return field(default=default, metadata=meta)


def positive(v):
    return None if v > 0 else "must be > 0"


def non_negative(v):
    return None if v >= 0 else "must be >= 0"


def fraction(v):
    return None if 0 < v < 1 else "must be between 0 and 1 (exclusive)"


def path_text(v):
    """A path option: not empty (that would silently mean the current directory), no NUL byte (no
    system call takes one), and a leading ``~user`` naming a user this machine knows."""
    if not v:
        return "must not be empty"
    if "\0" in v:
        return "must not contain a NUL byte"
    try:
        Path(v).expanduser()
    except RuntimeError:  # pathlib's "Could not determine home directory"
        return "names the home directory of an unknown user"
    return None


INT64_RANGE = (-2**63, 2**63 - 1)  # whole numbers reach torch and MPI as C int64 (seeds, sizes, counts)
COMM_POLL_US_MAX = 1e6  # a test-and-sleep period beyond a second is a stall, not politeness


@dataclass
class TrainConfig:
    # data
    data: str | None = opt(None, "text file or directory of text files (default: the Python standard library's .py files)",
                           check=path_text)
    cache_dir: str = opt("~/.cache/mpilm", "where the token cache lives (one file per corpus, keyed by its file list, sizes and mtimes)",
                         check=path_text)
    val_fraction: float = opt(0.01, "last fraction of the tokens kept for validation", check=fraction)
    data_io: str = opt("scatter", "how ranks get their block: scatter (rank 0 sends with Scatterv) or mpiio (each rank reads its range)", choices=DATA_IO)
    # model
    model: str = opt("gpt", "model family", choices=MODELS)
    n_layer: int = opt(4, "transformer blocks (gpt) or LSTM layers (lstm)", check=positive)
    n_head: int = opt(4, "attention heads (gpt)", check=positive)
    n_embd: int = opt(128, "embedding / hidden width", check=positive)
    block_size: int = opt(128, "context length in tokens", check=positive)
    dropout: float = opt(0.0, "dropout probability", check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)")
    # optimisation
    steps: int = opt(300, "optimizer steps (--sync async: the gradients the parameter server takes in all, one worker batch each, from whichever workers send them; the learning-rate schedule runs over them)", check=positive)
    batch_size: int = opt(16, "sequences per rank per micro-step (global batch = batch_size x ranks x grad_accum)", check=positive)
    grad_accum: int = opt(1, "micro-steps accumulated before each optimizer step", check=positive)
    optimizer: str = opt("adamw", "optimizer", choices=OPTIMIZERS)
    lr: float = opt(2e-3, "peak learning rate", check=positive)
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of --lr (cosine decay)", check=lambda v: None if 0 <= v <= 1 else "must be in [0, 1]")
    warmup_steps: int = opt(20, "linear learning-rate warm-up steps", check=non_negative)
    weight_decay: float = opt(0.1, "decoupled weight decay (adamw) or L2 (sgd) on matrices", check=non_negative)
    momentum: float = opt(0.9, "SGD momentum", check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)")
    grad_clip: float = opt(1.0, "clip the global norm of the averaged gradient to this value (0 disables); with "
                                "--compress topk prefer --local-clip: clipping the sparse aggregate discards what error "
                                "feedback held back", check=non_negative)
    seed: int = opt(1337, "seed for initialisation and batch sampling")
    # system
    device: str = opt("auto", "auto: cuda:<local rank> when a GPU is present, else cpu", choices=DEVICES)
    allreduce: str = opt("auto", "gradient allreduce algorithm", choices=ALLREDUCE_ALGORITHMS)
    bucket_mb: float = opt(BUCKET_MB_DEFAULT, "gradient bucket size in MiB: a bucket is reduced as soon as backward has "
                                              "filled it (smaller: more overlap, more messages)", check=positive)
    overlap: bool | None = opt(None, "reduce each gradient bucket on a communication thread while backward computes "
                                     "the rest (--no-overlap: all buckets after backward, on the main thread). Unset: "
                                     "on, except on one CPU node where every bucket goes through shared memory (a "
                                     "memory copy on the same cores: nothing to hide, and the thread costs ~3%%)")
    comm_poll_us: float = opt(COMM_POLL_US_DEFAULT, "with --overlap: the communication thread waits on its peers by testing "
                                                    "every N microseconds and sleeping in between, leaving the cores to "
                                                    "backward (0: MPI's own busy-polling wait; at most 1000000, a "
                                                    "second)",
                            check=lambda v: None if 0 <= v <= COMM_POLL_US_MAX else f"must be in [0, {COMM_POLL_US_MAX:.0f}]")
    comm_priority: int = opt(10, "with --overlap: run the communication thread this many nice levels ahead of the "
                                 "compute thread (raised if permitted, else the compute thread is lowered; 0: equal)",
                             check=lambda v: None if 0 <= v <= 19 else "must be in [0, 19]")
    zero: int = opt(0, "ZeRO stage: 1 shards the optimizer state over the ranks (reduce-scatter the gradients, "
                       "step this rank's shard, allgather the parameters)", choices=ZERO_STAGES)
    # how the ranks' steps talk (mpilm/modes/)
    sync: str = opt("sync", "sync: average gradients every step; async: rank 0 is a parameter server, the other ranks "
                            "push gradients and pull parameters without waiting for each other; local: each rank steps "
                            "alone, parameters averaged every --local-steps; diloco: --local-steps inner steps, then the "
                            "averaged pseudo-gradient feeds an outer Nesterov SGD (arXiv 2311.08105)", choices=SYNC_MODES)
    ps_ranks: int = opt(1, "async: parameter server ranks (0 .. K-1): each holds one contiguous slice of the flat "
                           "parameters and its optimizer state, so K servers divide the server's work and its link "
                           "traffic by K; the other ranks are workers", check=positive)
    async_pipeline: bool = opt(False, "async: a worker computes its next gradient while the last one travels to the "
                                      "servers and back, hiding the exchange behind compute; each gradient is then "
                                      "computed with parameters one update older")
    max_staleness: int = opt(-1, "async: drop gradients computed with parameters more than this many server updates "
                                 "old (counted in the summary; -1: apply every gradient)",
                             check=lambda v: None if v >= -1 else "must be >= -1 (-1: no limit)")
    staleness_lr: bool = opt(False, "async: divide the learning rate by a gradient's staleness (arXiv 1511.05950)")
    local_steps: int = opt(16, "local/diloco: steps each rank takes between exchanges (H)", check=positive)
    local_average_optimizer: bool = opt(False, "local: also average the optimizer state (moments) at each exchange")
    outer_lr: float = opt(0.7, "diloco: the outer optimizer's learning rate", check=positive)
    outer_momentum: float = opt(0.9, "diloco: the outer optimizer's momentum",
                                check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)")
    outer_nesterov: bool = opt(True, "diloco: Nesterov momentum in the outer optimizer")
    # gradient compression
    compress: str = opt("none", "gradient compression on the wire (with --sync diloco: of the pseudo-gradients). "
                                "sign: 1 bit per element plus a scale per --sign-chunk, with error feedback (~32x fewer "
                                "bytes at 2 ranks; the allgather grows with the ranks); under AdamW it sends each rank's "
                                "Adam update and is the one to pick: it ends closer to dense AdamW than topk at the "
                                "same bytes (README 'Top-k and sign under AdamW')",
                        choices=COMPRESSORS)
    topk_ratio: float = opt(0.01, "topk: fraction of each bucket's entries sent per step (density)",
                            check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]")
    error_feedback: bool = opt(True, "topk, sign: keep what was not sent in a local residual and add it next step")
    topk_aggregate: str = opt("allgather", "topk: allgather every rank's pairs, or gtopk (re-select top-k in a recursive-doubling tree)", choices=TOPK_AGGREGATES)
    momentum_correction: bool = opt(False, "topk: DGC momentum correction (accumulate velocity, not gradient; needs --optimizer sgd, whose momentum it replaces)")
    topk_warmup_steps: int = opt(0, "topk: density decays exponentially from 25%% to --topk-ratio over this many steps", check=non_negative)
    local_clip: float = opt(0.0, "topk, sign: clip each rank's gradient norm (per bucket, to this / sqrt(ranks)) before accumulation (0 disables)", check=non_negative)
    topk_adam: str = opt("precondition-momentum",
                         "topk with --optimizer adamw: how Adam meets the sparse, error-fed sum (README "
                         "'Convergence with compression'). precondition-momentum: each rank takes Adam's whole "
                         "update (its own second and first moments) before top-k, and error feedback sends "
                         "the sum of those updates, which the optimizer applies with decoupled decay (no extra "
                         "bytes); precondition: only the second moment before top-k, the first moment after; "
                         "frozen: 1-bit Adam, dense AdamW for --topk-adam-warmup steps, then the second moment "
                         "frozen; plain: AdamW on the sparse sum (its second moment squares the bursts and "
                         "normalises them away). The sparse sum is not clipped (--grad-clip applies in plain, and "
                         "in frozen's dense steps)", choices=TOPK_ADAM)
    topk_adam_warmup: int = opt(30, "--topk-adam's early phase: precondition variants: the density decays "
                                    "exponentially from 25%% to --topk-ratio over this many steps (0: none); "
                                    "frozen: dense steps of plain AdamW before the second moment freezes (at "
                                    "least 1; they send dense bytes)", check=non_negative)
    sign_chunk: int = opt(2048, "sign: elements that share one fp32 scale (the chunk's mean |value|; 4 bytes each, "
                                "beside 1 bit per element); 0: one scale per bucket", check=non_negative)
    sign_sqrt_ranks: bool = opt(True, "sign under AdamW: multiply each rank's Adam-normalised gradient by sqrt(ranks). "
                                      "Each rank divides by the second moment of its own batch, which holds ranks "
                                      "times the noise of the averaged batch's, so its updates come out up to "
                                      "sqrt(ranks) smaller than dense AdamW's (Adam's square-root scaling rule, "
                                      "arXiv 2205.10287; the noise-dominated limit)")
    # evaluation and output
    eval_every: int = opt(100, "evaluate the validation loss every N steps (and at the end)", check=positive)
    eval_batches: int = opt(8, "validation batches (of --batch-size sequences, spread over all ranks) per evaluation", check=positive)
    log_every: int = opt(10, "print and record metrics every N steps", check=positive)
    sample: int = opt(0, "print N generated characters from rank 0 at the end", check=non_negative)
    out: str | None = opt(None, "output directory (default: runs/<timestamp>)", check=path_text)
    trace: str | None = opt(None, "write a Chrome trace (open in ui.perfetto.dev or chrome://tracing) of every rank's phases and per-bucket collectives to this JSON file",
                            check=path_text)
    comm_timeout: float = opt(300.0, "abort the job when a wait on the other ranks (a gradient bucket, an evaluation, "
                                     "a checkpoint) lasts longer than this many seconds, naming what it waited for",
                              check=lambda v: None if v >= 1 else "must be >= 1 (seconds)")
    slow_rank: int = opt(-1, "experiments: make this rank a straggler (its forward and backward take --slow-factor "
                             "times as long, by sleeping after them); -1: none",
                         check=lambda v: None if v >= -1 else "must be >= -1 (-1: none)")
    slow_factor: float = opt(2.0, "with --slow-rank: how many times slower that rank computes",
                             check=lambda v: None if v >= 1 else "must be >= 1")
    max_bad_steps: int = opt(10, "a step whose averaged gradient norm is not finite is skipped on every rank; this "
                                 "many in a row stop the run", check=positive)
    # checkpoints
    ckpt_every: int = opt(0, "write a checkpoint (every rank's state, in the background) every N steps; 0: none",
                          check=non_negative)
    ckpt_dir: str | None = opt(None, "where checkpoints go, one directory step-<N> each (default: <out>/ckpt)",
                               check=path_text)
    keep_ckpts: int = opt(3, "keep the newest N complete checkpoints (0: keep all)", check=non_negative)
    resume: str | None = opt(None, "continue from a checkpoint: a step-<N> directory, or auto (the newest complete "
                                   "one in --ckpt-dir; none there: start from step 0)", check=path_text)
    trace_steps: int = opt(20, "how many steps --trace records, from the first (bounds its memory and file size)", check=positive)

    # ---- derived helpers
    @property
    def tokens_per_step_per_rank(self) -> int:
        return self.batch_size * self.block_size * self.grad_accum

    @property
    def topk_adam_in_effect(self) -> str:
        """The ``--topk-adam`` variant this run uses: its own with synchronous top-k under AdamW, else
        ``plain`` (no top-k, SGD, or another --sync mode, whose top-k, if any, is not Adam's input)."""
        if self.compress == "topk" and self.optimizer == "adamw" and self.sync == "sync":
            return self.topk_adam
        return "plain"

    @property
    def adam_variant_in_effect(self) -> str:
        """How AdamW meets this run's compressed exchange (an ``optim.TOPK_ADAM`` name): ``--topk-adam``
        under top-k, precondition-momentum under synchronous sign (its only way), else ``plain``."""
        if self.compress == "sign" and self.optimizer == "adamw" and self.sync == "sync":
            return "precondition-momentum"
        return self.topk_adam_in_effect

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fields():
    return [f for f in dataclasses.fields(TrainConfig)]


def _type_of(f) -> type:
    text = str(f.type)
    for name, t in (("int", int), ("float", float), ("bool", bool), ("str", str)):
        if text.startswith(name):
            return t
    return str


_KIND_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a text"}


def _is_kind(value, kind: type) -> bool:
    """``value`` is of the option's kind (a whole number also counts as a number; a bool as neither)."""
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def _number(kind: type):
    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_KIND_WORDS[kind]}, got {text!r}") from None

    return convert


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting on every rank."""

    quiet = False  # ranks other than 0 parse silently, so --help prints once

    def error(self, message):
        raise UsageError(message)

    def _print_message(self, message, file=None):
        if not self.quiet:
            super()._print_message(message, file)


def build_parser(quiet: bool = False) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m mpilm.train",
        description="Data-parallel LM training over MPI. Launch: mpirun -np N python -m mpilm.train [options]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.quiet = quiet
    parser.add_argument("--config", metavar="FILE.toml", help="read options from a TOML file (command line wins)")
    for f in _fields():
        flag = "--" + f.name.replace("_", "-")
        kind = _type_of(f)
        kwargs = dict(help=f.metadata["help"], default=argparse.SUPPRESS, dest=f.name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if kind in (int, float):
            kwargs["type"] = _number(kind)
        # choices are checked in check() so the message names the option the way the file does too
        kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}" if f.metadata["choices"] else f.name.upper()
        parser.add_argument(flag, **kwargs)
    return parser


def _read_toml(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        with p.open("rb") as fh:
            table = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:  # TOML is UTF-8 text: a binary file is neither
        raise UsageError(f"--config {path}: not valid TOML ({err})") from None
    except OSError as err:
        raise UsageError(f"--config {path}: cannot read ({err.strerror or err})") from None
    known = {f.name: f for f in _fields()}
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UsageError(f"--config {path}: unknown option '{key}' (see --help for the list)")
        kind = _type_of(known[name])
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is not None and not _is_kind(value, kind):
            raise UsageError(f"--config {path}: '{key}' = {value!r}: expected {kind.__name__}")
        values[name] = value
    return values


def check(cfg: TrainConfig) -> TrainConfig:
    """Raise UsageError naming the first option that is out of range."""
    for f in _fields():
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if value is not None and not _is_kind(value, _type_of(f)):  # e.g. argparse's [] for "--lr=--"
            raise UsageError(f"{flag} {value!r}: expected {_KIND_WORDS[_type_of(f)]}")
        choices = f.metadata["choices"]
        if choices and value not in choices:
            raise UsageError(f"{flag} {value}: expected one of {', '.join(map(str, choices))}")
        problem = f.metadata["check"](value) if f.metadata["check"] and value is not None else None
        if isinstance(value, float) and not math.isfinite(value):
            problem = "must be a finite number"
        if type(value) is int and not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
            problem = "must fit in 64 bits (-2**63 to 2**63-1)"
        if problem:
            raise UsageError(f"{flag} {value}: {problem}")
    if cfg.momentum_correction and (cfg.compress != "topk" or cfg.optimizer != "sgd"):
        raise UsageError("--momentum-correction needs --compress topk and --optimizer sgd (it takes over SGD's momentum)")
    if cfg.momentum_correction and not cfg.error_feedback:
        raise UsageError("--momentum-correction accumulates velocity in the residual: it needs --error-feedback")
    defaults = {f.name: f.default for f in _fields()}
    if cfg.topk_adam != defaults["topk_adam"] and (cfg.compress != "topk" or cfg.optimizer != "adamw"):
        raise UsageError(f"--topk-adam {cfg.topk_adam} applies only with --compress topk and --optimizer adamw")
    if cfg.topk_adam_warmup != defaults["topk_adam_warmup"] and cfg.topk_adam_in_effect == "plain":
        raise UsageError("--topk-adam-warmup applies only to --topk-adam precondition-momentum, precondition or "
                         "frozen under --compress topk and --optimizer adamw (plain's density warm-up is "
                         "--topk-warmup-steps)")
    if cfg.topk_warmup_steps != defaults["topk_warmup_steps"] and cfg.topk_adam_in_effect.startswith("precondition"):
        raise UsageError(f"--topk-warmup-steps with --topk-adam {cfg.topk_adam_in_effect}: this variant's density "
                         "warm-up is --topk-adam-warmup")
    if cfg.topk_adam_in_effect == "frozen" and cfg.topk_adam_warmup < 1:
        raise UsageError("--topk-adam frozen needs --topk-adam-warmup >= 1 (the second moment is taken from "
                         "those dense steps)")
    if cfg.topk_adam_in_effect == "precondition-momentum" and not cfg.error_feedback:
        raise UsageError("--topk-adam precondition-momentum accumulates the first moment in the residual: it "
                         "needs --error-feedback")
    if cfg.topk_adam_in_effect == "frozen" and cfg.topk_adam_warmup >= cfg.steps:
        raise UsageError(f"--topk-adam-warmup {cfg.topk_adam_warmup} must be below --steps {cfg.steps} (the "
                         "second moment freezes after it; every step would be dense)")
    if cfg.zero == 1 and cfg.compress in ("topk", "sign"):
        raise UsageError(f"--zero 1 with --compress {cfg.compress}: its allgathered messages have no reduce-scatter "
                         "half; use --compress none|fp16|bf16 with --zero 1, or --zero 0")
    if cfg.sign_chunk != defaults["sign_chunk"] and cfg.compress != "sign":
        raise UsageError(f"--sign-chunk applies only with --compress sign (this run has --compress {cfg.compress})")
    if cfg.sign_sqrt_ranks != defaults["sign_sqrt_ranks"] and not (cfg.compress == "sign" and
                                                                  cfg.adam_variant_in_effect != "plain"):
        raise UsageError("--no-sign-sqrt-ranks applies only with --compress sign under --optimizer adamw and --sync sync")
    if cfg.adam_variant_in_effect == "precondition-momentum" and cfg.compress == "sign" and not cfg.error_feedback:
        raise UsageError("--compress sign under --optimizer adamw sends the sum of Adam updates through the "
                         "residual: it needs --error-feedback")
    if cfg.zero == 1 and cfg.allreduce not in SHARDED_ALGORITHMS:
        raise UsageError(f"--zero 1 with --allreduce {cfg.allreduce}: it needs an algorithm with reduce-scatter and "
                         f"allgather halves ({', '.join(SHARDED_ALGORITHMS)})")
    for name, modes in MODE_OPTIONS.items():
        if cfg.sync not in modes and getattr(cfg, name) != defaults[name]:
            raise UsageError(f"--{name.replace('_', '-')} applies only with --sync {' or '.join(modes)} "
                             f"(this run has --sync {cfg.sync})")
    if cfg.sync != "sync" and cfg.zero:
        raise UsageError(f"--sync {cfg.sync} with --zero 1: every rank steps its own full optimizer between "
                         "exchanges; use --zero 0")
    if cfg.sync != "sync" and cfg.overlap:
        raise UsageError(f"--sync {cfg.sync} with --overlap: no gradients are exchanged during backward; "
                         "drop --overlap")
    if cfg.sync == "async" and cfg.compress != "none":
        raise UsageError(f"--sync async with --compress {cfg.compress}: workers send gradients to the parameter server "
                         "uncompressed; drop --compress (--sync diloco compresses its exchange)")
    if cfg.sync == "local" and cfg.compress != "none":
        raise UsageError(f"--sync local with --compress {cfg.compress}: parameters are averaged uncompressed; "
                         "--sync diloco compresses its exchange (pseudo-gradients, with error feedback for topk)")
    if cfg.model == "gpt" and cfg.n_embd % cfg.n_head:
        raise UsageError(f"--n-embd {cfg.n_embd} must be divisible by --n-head {cfg.n_head}")
    return cfg


def parse(argv: list[str] | None = None, quiet: bool = False, run_name: str | None = None) -> TrainConfig:
    """Defaults < ``--config`` file < command line, then checked. Raises UsageError.

    ``quiet`` silences ``--help`` output (for ranks other than 0). ``run_name`` names the default
    ``--out`` (``runs/<run_name>``; default: this process's clock, which ranks may read a second
    apart: the trainer passes rank 0's).
    """
    args = vars(build_parser(quiet).parse_args(argv))
    values = _read_toml(args.pop("config")) if args.get("config") is not None else {}
    args.pop("config", None)
    values.update(args)
    cfg = TrainConfig(**values)
    if cfg.out is None:
        cfg.out = f"runs/{run_name or time.strftime('%Y%m%d-%H%M%S')}"
    return check(cfg)
