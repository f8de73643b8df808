"""The option table: parsing, TOML files, precedence and the checks that become `error: ...`."""

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
])
def test_bad_values_raise_usage_error(argv, needle):
    with pytest.raises(UsageError, match=None) as err:
        config.parse(argv)
    assert needle in str(err.value)


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
