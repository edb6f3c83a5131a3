"""Config resolution: preset < config file < flags < KEY=VALUE overrides; bad keys are CLIErrors."""

import json

import moe_models
import pytest
from moe_train.config import TrainConfig, parse_value, resolve, split_overrides
from moe_train.errors import CLIError


def test_defaults_are_the_default_preset_and_train_config():
    cfg = resolve()
    assert cfg.preset == "tiny-sigma-moe"
    assert cfg.model == moe_models.get_config("tiny-sigma-moe")
    assert cfg.train == TrainConfig()
    assert cfg.data is None


def test_overrides_reach_model_and_train_fields_with_their_types():
    cfg = resolve(
        overrides=["d_model=64", "model.n_layers=3", "train.lr=3e-4", "train.schedule=linear"]
    )
    assert cfg.model.d_model == 64 and cfg.model.n_layers == 3
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.schedule == "linear"


def test_ffn_takes_a_type_name_or_a_json_table():
    assert moe_models.ffn_name(resolve(overrides=["ffn=dense"]).model.ffn) == "dense"
    cfg = resolve(overrides=['ffn={"type": "dense", "d_ff": 96}'])
    assert moe_models.ffn_name(cfg.model.ffn) == "dense" and cfg.model.ffn.d_ff == 96
    cfg = resolve(overrides=["ffn.expert_size=32", "k=3"])
    assert (cfg.model.ffn.expert_size, cfg.model.ffn.k) == (32, 3)


def test_attention_takes_a_type_name_a_json_table_or_options():
    cfg = resolve(overrides=["arch=decoder", "attention=causal"])
    assert moe_models.attention_name(cfg.model.attention) == "causal"
    cfg = resolve(overrides=['attention={"type": "relative"}', "n_heads=2"])
    assert moe_models.attention_name(cfg.model.attention) == "relative"
    assert cfg.model.attention.n_heads == 2
    with pytest.raises(CLIError, match=r"unknown attention option\(s\) \['nope'\]"):
        resolve(overrides=["attention.nope=1"])
    with pytest.raises(CLIError, match="unknown attention type 'nope'"):
        resolve(overrides=["attention=nope"])


def test_seq_len_flag_reaches_the_model():
    assert resolve(model_flags={"seq_len": 32}).model.seq_len == 32


def test_precedence_file_then_flags_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'preset = "tiny-dense"\ndata = "default"\n[model]\nd_model = 48\n'
        "[train]\nlr = 0.5\nmax_steps = 7\nseed = 3\n"
    )
    cfg = resolve(
        config_file=str(path), flags={"max_steps": 9, "seed": None}, overrides=["train.lr=0.25"]
    )
    assert cfg.preset == "tiny-dense" and cfg.data == "default"
    assert cfg.model.d_model == 48
    assert cfg.train.max_steps == 9  # flag beats file
    assert cfg.train.seed == 3  # flag not given: file stays
    assert cfg.train.lr == 0.25  # override beats file


def test_saved_config_json_feeds_back(tmp_path):
    cfg = resolve(preset="tiny-gshard", overrides=["d_model=32", "n_heads=2", "train.batch_size=8"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    again = resolve(config_file=str(path))
    assert again.model == cfg.model and again.train == cfg.train and again.preset == "tiny-gshard"


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"preset": "no-such-preset"}, "no-such-preset"),
        ({"overrides": ["no_such_field=1"]}, "no_such_field"),
        ({"overrides": ["train.no_such_option=1"]}, "train.no_such_option"),
        ({"overrides": ["train.lr=fast"]}, "train.lr"),
        ({"overrides": ["d_model"]}, "d_model"),
        ({"overrides": ["train.schedule=wavy"]}, "schedule"),
        ({"overrides": ["train.batch_size=0"]}, "batch_size"),
        ({"config_file": "/nonexistent/run.toml"}, "/nonexistent/run.toml"),
    ],
)
def test_bad_configuration_is_a_clierror_naming_it(kwargs, needle):
    with pytest.raises(CLIError, match=None) as info:
        resolve(**kwargs)
    assert needle in str(info.value)


def test_config_file_with_unknown_table_or_bad_syntax(tmp_path):
    bad_key = tmp_path / "a.json"
    bad_key.write_text(json.dumps({"optimizer": {}}))
    with pytest.raises(CLIError, match="optimizer"):
        resolve(config_file=str(bad_key))
    bad_syntax = tmp_path / "b.toml"
    bad_syntax.write_text("preset = \n")
    with pytest.raises(CLIError, match="b.toml"):
        resolve(config_file=str(bad_syntax))


@pytest.mark.parametrize(
    "text, hint, expected",
    [
        ("true", bool, True),
        ("0", bool, False),
        ("12", int, 12),
        ("1e-3", float, 1e-3),
        ("none", float | None, None),
        ("4", int | None, 4),
        ("gelu", str, "gelu"),
    ],
)
def test_parse_value_reads_the_type_of_the_field(text, hint, expected):
    assert parse_value(text, "k", hint) == expected


def test_parse_value_names_the_field_it_cannot_read():
    with pytest.raises(CLIError, match="train.lr='fast'"):
        parse_value("fast", "train.lr", float)


def test_split_overrides_routes_by_prefix():
    model, train = split_overrides(["a=1", "model.b=2", "train.c=3"])
    assert model == {"a": "1", "b": "2"} and train == {"c": "3"}
