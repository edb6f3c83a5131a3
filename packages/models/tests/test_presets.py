"""Presets, configs and their errors: counts, overrides, JSON round trip, clear failures."""

import json

import moe_layers
import moe_models
import pytest
import torch
from moe_models import PAPER_SIZES, SIZE_TOLERANCE


def test_preset_names():
    names = moe_models.presets()
    assert len(names) == len(set(names))
    for required in (
        "tiny-sigma-moe",
        "tiny-dense",
        "tiny-gshard",
        "tiny-smlp",
        "tiny-topk",
        "tiny-pkm",
        "tiny-switch",
        "tiny-sbase",
        "tiny-base",
        "tiny-hash",
        "sigma-moe-wt103-small",
        "sigma-moe-wt103-big",
        "sigma-moe-enwik8",
        "dense-wt103-small",
        "dense-wt103-big",
        "dense-enwik8",
        "artetxe-dense-125m",
        "artetxe-moe-15b",
    ):
        assert required in names


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_preset_parameter_count_matches_paper(name):
    """Counted on the meta device, so the 15B and 52B presets count without memory."""
    stated = PAPER_SIZES[name]
    total = moe_models.count_parameters(moe_models.get_config(name))["total"]
    assert abs(total - stated) / stated <= SIZE_TOLERANCE.get(name, 0.02), (name, total, stated)


def test_only_the_rounded_15b_name_needs_a_wider_tolerance():
    assert set(SIZE_TOLERANCE) <= {"artetxe-moe-15b"}
    assert all(t <= 0.03 for t in SIZE_TOLERANCE.values())


@pytest.mark.parametrize("name", moe_models.presets())
def test_every_preset_accepts_vocab_size_and_round_trips_through_json(name):
    cfg = moe_models.get_config(name, vocab_size=101)
    assert cfg.vocab_size == 101
    again = moe_models.config_from_dict(json.loads(json.dumps(moe_models.config_to_dict(cfg))))
    assert again == cfg


@pytest.mark.parametrize("name", [n for n in moe_models.presets() if n.startswith("tiny-")])
def test_tiny_presets_build_and_run(name):
    torch.manual_seed(0)
    model = moe_models.build(name, vocab_size=50)
    assert model.config.vocab_size == 50
    assert model.arch == model.config.arch
    tokens = torch.randint(0, 50, (2, 8))
    out = model(tokens, tokens)
    assert out.logits.shape == (2, 8, 50)
    assert torch.isfinite(out.loss)
    assert (out.mems is not None) == (model.arch == "transformer_xl")


def test_overrides_switch_the_ffn_and_set_nested_options():
    cfg = moe_models.get_config("tiny-sigma-moe", ffn="dense")
    assert cfg.ffn.type == "dense" and cfg.ffn.d_ff == moe_models.get_config("tiny-dense").ffn.d_ff
    cfg = moe_models.get_config("tiny-sigma-moe", n_experts=16, **{"ffn.k": 3}, n_layers=3)
    assert (cfg.ffn.n_experts, cfg.ffn.k, cfg.n_layers) == (16, 3, 3)
    cfg = moe_models.get_config("tiny-sigma-moe", ffn={"expert_size": 32})
    assert cfg.ffn.expert_size == 32 and cfg.ffn.type == "sigma_moe"
    cfg = moe_models.get_config("tiny-dense", layer_ffn={"1": {"type": "dense", "d_ff": 40}})
    assert 1 in cfg.layer_ffn


def test_build_keeps_the_config():
    model = moe_models.build("tiny-dense", n_layers=1)
    assert model.config == moe_models.get_config("tiny-dense", n_layers=1)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(name="no-such-model"), "unknown preset 'no-such-model'.*tiny-sigma-moe"),
        (dict(colour=3), "unknown config override 'colour'.*vocab_size"),
        (dict(ffn="moe9000"), "unknown ffn.type 'moe9000'.*sigma_moe"),
        (dict(ffn={"experts": 3}), r"unknown FFN option\(s\) \['experts'\]"),
        (dict(k=9), r"ffn.k must be in \[1, n_experts=8\]"),
        (dict(n_heads=3), "d_model=128 is not divisible by n_heads=3"),
        (dict(d_model=0), "d_model must be a positive integer"),
        (dict(expert_size=-4), "ffn.expert_size must be a positive integer"),
        (dict(dropout=1.5), r"dropout must be in \[0, 1\)"),
        (dict(arch="rnn"), "unknown arch 'rnn'"),
        (dict(layer_ffn={7: "dense"}), "layer_ffn names layer 7"),
        (dict(layer_ffn={0: {"type": "topk", "d_ff": 8, "k": 9}}), r"layer_ffn\[0\].k must be"),
        (dict(moe_interval=-1), "moe_interval must be >= 0"),
    ],
)
def test_bad_configs_are_clear_errors(kwargs, message):
    name = kwargs.pop("name", "tiny-sigma-moe")
    with pytest.raises(ValueError, match=message):
        moe_models.build(name, **kwargs)


def test_bad_smlp_configs_are_clear_errors():
    with pytest.raises(ValueError, match="smlp_n_chunks=3 equal chunks"):
        moe_models.get_config("tiny-smlp", smlp_n_chunks=3)
    with pytest.raises(ValueError, match="smlp_d_ff must be even"):
        moe_models.get_config("tiny-smlp", smlp_d_ff=31)
    with pytest.raises(ValueError, match="unknown smlp_routing"):
        moe_models.get_config("tiny-smlp", smlp_routing="magic")
    with pytest.raises(ValueError, match=r"layer_ffn names sMLP blocks \[0\]"):
        moe_models.get_config("tiny-smlp", layer_ffn={0: {"type": "dense", "d_ff": 8}})


def test_config_from_dict_rejects_unknown_keys():
    d = moe_models.config_to_dict(moe_models.get_config("tiny-dense"))
    d["n_layer"] = 3
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['n_layer'\]"):
        moe_models.config_from_dict(d)


def test_a_layer_moe_layers_lacks_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(moe_layers, "SigmaMoE")
    with pytest.raises(ValueError, match="needs moe_layers.SigmaMoE"):
        moe_models.build("tiny-sigma-moe")
