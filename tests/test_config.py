"""The option table: parsing, TOML files, precedence and the checks that become `error: ...`."""

import dataclasses

import pytest

from mpilm import config
from mpilm.errors import UsageError


def test_defaults_parse_and_out_dir():
    cfg = config.parse([])
    assert cfg.model == "gpt" and cfg.allreduce == "auto" and cfg.out.startswith("runs/")


def test_command_line_beats_config_file(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('steps = 7\nlr = 1\nmodel = "lstm"\nbatch-size = 3\n')
    cfg = config.parse(["--config", str(f), "--steps", "9"])
    assert (cfg.steps, cfg.lr, cfg.model, cfg.batch_size) == (9, 1.0, "lstm", 3)


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "--steps 0: must be > 0"),
    (["--batch-size", "-1"], "--batch-size -1"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--block-size", "0"], "--block-size 0"),
    (["--model", "rnn"], "--model rnn: expected one of gpt, lstm"),
    (["--allreduce", "magic"], "--allreduce magic"),
    (["--device", "tpu"], "--device tpu"),
    (["--steps", "ten"], "expected a whole number"),
    (["--no-such-option"], "unrecognized arguments"),
    (["--n-embd", "30", "--n-head", "4"], "divisible"),
    (["--config", "/nonexistent.toml"], "no such file"),
    (["--compress", "topk", "--momentum-correction", "--optimizer", "sgd", "--no-error-feedback"], "needs --error-feedback"),
    (["--momentum-correction"], "needs --compress topk and --optimizer sgd"),
    (["--topk-ratio", "0"], "--topk-ratio 0.0"),
    (["--topk-aggregate", "tree"], "--topk-aggregate tree: expected one of"),
    (["--local-clip", "-1"], "--local-clip -1.0"),
    (["--zero", "2"], "--zero 2: expected one of 0, 1"),
    (["--zero", "1", "--compress", "topk"], "no reduce-scatter half"),
    (["--zero", "1", "--allreduce", "tree"], "--zero 1 with --allreduce tree"),
    # options added since the spine: names, ranges, combinations, paths
    (["--compress", "zstd"], "--compress zstd: expected one of none, fp16, bf16, topk"),
    (["--allreduce", "Ring"], "--allreduce Ring: expected one of auto, ring"),
    (["--data-io", "nfs"], "--data-io nfs: expected one of scatter, mpiio"),
    (["--topk-ratio", "1.5"], "--topk-ratio 1.5: must be in (0, 1]"),
    (["--topk-ratio", "-0.1"], "--topk-ratio -0.1: must be in (0, 1]"),
    (["--topk-ratio", "nan"], "--topk-ratio nan: must be a finite number"),
    (["--bucket-mb", "0"], "--bucket-mb 0.0: must be > 0"),
    (["--bucket-mb", "-1"], "--bucket-mb -1.0: must be > 0"),
    (["--bucket-mb", "inf"], "--bucket-mb inf: must be a finite number"),
    (["--comm-timeout", "0"], "--comm-timeout 0.0: must be >= 1 (seconds)"),
    (["--comm-timeout", "-1"], "--comm-timeout -1.0: must be >= 1 (seconds)"),
    (["--comm-timeout", "1e-300"], "must be >= 1 (seconds)"),
    (["--comm-poll-us", "-1"], "--comm-poll-us -1.0: must be in [0, 1000000]"),
    (["--comm-poll-us", "1e26"], "--comm-poll-us 1e+26: must be in [0, 1000000]"),
    (["--comm-priority", "20"], "--comm-priority 20: must be in [0, 19]"),
    (["--max-bad-steps", "0"], "--max-bad-steps 0: must be > 0"),
    (["--max-bad-steps", "-1"], "--max-bad-steps -1: must be > 0"),
    (["--ckpt-every", "-1"], "--ckpt-every -1: must be >= 0"),
    (["--keep-ckpts", "-1"], "--keep-ckpts -1: must be >= 0"),
    (["--seed", str(2**64)], "--seed 18446744073709551616: must fit in 64 bits"),
    (["--resume", ""], "--resume : must not be empty"),
    (["--data", ""], "--data : must not be empty"),
    (["--ckpt-dir", "~no-such-user-mpilm/ckpt"], "--ckpt-dir ~no-such-user-mpilm/ckpt: names the home directory of an unknown user"),
    (["--model", "gpt\nlstm"], "--model gpt\\nlstm: expected one of"),  # one line, the line break shown escaped
])
def test_bad_values_raise_usage_error(argv, needle):
    with pytest.raises(UsageError, match=None) as err:
        config.parse(argv)
    assert needle in str(err.value)


def test_a_usage_error_is_one_line():
    """Whatever it quotes: a path may hold a line break, and the policy is one `error:` line."""
    assert str(UsageError("--data /tmp/a\r\nb: no such file or directory")) == \
        "--data /tmp/a\\r\\nb: no such file or directory"


def test_bad_config_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("stepz = 3\n")
    with pytest.raises(UsageError, match="unknown option 'stepz'"):
        config.parse(["--config", str(f)])
    f.write_text('steps = "many"\n')
    with pytest.raises(UsageError, match="expected int"):
        config.parse(["--config", str(f)])
    f.write_text("steps = [\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        config.parse(["--config", str(f)])
    f.write_bytes(bytes(range(256)))  # not UTF-8 text at all
    with pytest.raises(UsageError, match="not valid TOML"):
        config.parse(["--config", str(f)])
    f.write_text('data = ""\nseed = 18446744073709551616\n')  # the file's values pass the same checks
    with pytest.raises(UsageError, match="--data : must not be empty"):
        config.parse(["--config", str(f)])
    with pytest.raises(UsageError, match="no such file"):
        config.parse(["--config", ""])


def test_algorithm_names_match_the_collectives():
    from mpilm.comm import collectives

    assert set(config.ALLREDUCE_ALGORITHMS) == set(collectives.ALGORITHMS)


def test_compressor_and_aggregate_names_match_comm():
    from mpilm.comm import compress

    assert config.COMPRESSORS == compress.COMPRESSORS and config.TOPK_AGGREGATES == compress.TOPK_AGGREGATES


def test_zero_algorithms_match_the_collectives_with_two_halves():
    from mpilm.comm import collectives

    assert set(config.SHARDED_ALGORITHMS) == set(collectives.REDUCE_SCATTER_ALGORITHMS)


def test_every_option_has_help():
    parser = config.build_parser()
    for action in parser._actions:
        assert action.help, action.dest


def test_resume_may_change_only_options_that_exist():
    from mpilm import checkpoint

    names = {f.name for f in dataclasses.fields(config.TrainConfig)}
    assert checkpoint.RESUME_MAY_DIFFER <= names, checkpoint.RESUME_MAY_DIFFER - names


def test_config_mismatch_names_what_the_state_depends_on():
    from mpilm import checkpoint

    saved = config.parse(["--n-embd", "16", "--n-head", "2", "--steps", "10", "--out", "a"]).to_dict()
    extended = config.parse(["--n-embd", "16", "--n-head", "2", "--steps", "20", "--out", "b", "--log-every", "1",
                             "--comm-timeout", "30", "--allreduce", "ring", "--no-overlap"]).to_dict()
    assert checkpoint.config_mismatch(saved, extended) == []
    other = config.parse(["--n-embd", "32", "--n-head", "2", "--model", "lstm", "--zero", "1"]).to_dict()
    assert checkpoint.config_mismatch(saved, other) == ["--model 'gpt' (this run: 'lstm')",
                                                        "--n-embd 16 (this run: 32)", "--zero 0 (this run: 1)"]
    older = {k: v for k, v in saved.items() if k != "zero"}  # a checkpoint from an mpilm without --zero
    assert checkpoint.config_mismatch(older, {**saved, "zero": 1}) == []
