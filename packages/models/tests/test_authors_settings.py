"""The authors' settings at the model level: the presets that use them (the σ-MoE PKM's dense path,
the σ-MoE authors' Switch init) and fairseq's standalone BASE blocks (moe_placement, n_moe_layers)."""

import json

import moe_models
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_models import count_parameters, dense_twin, ffn_name
from moe_models.config import fairseq_base_positions


def test_pkm_preset_takes_the_authors_dense_path():
    cfg = moe_models.get_config("pkm-wt103-small")
    f = cfg.ffn
    assert (f.n_keys, f.n_heads, f.knn, f.activation) == (62, 4, 128, "relu")
    assert f.dense_path
    # every FFN is a dense-path PKM: every parameter of the model is active
    counts = count_parameters(cfg)
    assert counts["active"] == counts["total"]
    topk = moe_models.get_config("pkm-wt103-small", selection="topk")
    assert count_parameters(topk)["total"] == counts["total"]
    assert count_parameters(topk)["active"] < counts["total"]


@pytest.mark.parametrize("name", ["switch-wt103-small", "switch-wt103-big"])
def test_switch_presets_use_the_authors_init(name):
    f = moe_models.get_config(name).ffn
    assert (f.init, f.init_scale, f.normalize_gate_rows) == ("expert_size", 0.1, False)
    assert (f.capacity_factor, f.balance_variant) == (None, "csordas")


def test_switch_big_preset_has_the_measured_stds():
    """Measured on the authors' code at d=1024, E=8, G=512, L=18: W1 0.00329, W2 0.00466."""
    f = moe_models.get_config("switch-wt103-big").ffn
    assert (f.d_model, f.n_experts, f.expert_size, f.n_layers) == (1024, 8, 512, 18)
    torch.manual_seed(0)
    layer = f.build()
    assert layer.experts.w1.std().item() == pytest.approx(0.00329, rel=0.02)
    assert layer.experts.w2.std().item() == pytest.approx(0.00466, rel=0.02)


def _base_ffn(**options):
    return {"type": "base", "n_experts": 4, "expert_size": 16, **options}


def _standalone(arch, **overrides):
    base = moe_models.ModelConfig(
        arch=arch,
        vocab_size=37,
        d_model=32,
        n_layers=4,
        n_heads=2,
        seq_len=16,
        d_ff=64,
        moe_interval=2,
        ffn=_base_ffn(zero_init_output=True, expert_norm=True),
        moe_placement="standalone",
    )
    return moe_models.get_config(base, **overrides)


@pytest.mark.parametrize("arch", ["transformer_xl", "decoder"])
def test_standalone_placement_keeps_the_dense_ffn_and_adds_a_block(arch):
    cfg = _standalone(arch)
    for i in range(cfg.n_layers):
        assert ffn_name(cfg.layer_ffn_config(i)) == "dense"
        assert (cfg.standalone_config(i) is not None) == cfg.is_moe_layer(i)
    model = moe_models.build(cfg)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "StandaloneBlock"]
    assert blocks == ["layers.1.standalone", "layers.3.standalone"]
    assert count_parameters(cfg) == count_parameters(model)
    assert count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())
    # per block, 3 of the 4 experts (w1 and w2, 32 x 16 each) and 3 experts' norms are inactive
    inactive = 2 * 3 * (2 * 32 * 16 + 2 * 32)
    assert count_parameters(cfg)["active"] == count_parameters(cfg)["total"] - inactive


@pytest.mark.parametrize("arch", ["transformer_xl", "decoder"])
def test_zero_initialised_standalone_blocks_start_as_the_identity(arch):
    torch.manual_seed(0)
    model = moe_models.build(_standalone(arch, dropout=0.0)).train()
    plain = moe_models.build(_standalone(arch, dropout=0.0, moe_placement="ffn", ffn="dense"))
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".standalone." in k for k in unexpected) and unexpected
    tokens = torch.randint(0, 37, (2, 10))
    torch.testing.assert_close(model(tokens).logits, plain.train()(tokens).logits, rtol=0, atol=0)
    out = model(tokens, tokens)
    out.loss.backward()
    assert model.layers[1].standalone.layer.experts.w2.grad.abs().sum() > 0


def test_standalone_block_routes_on_the_raw_residual_stream():
    torch.manual_seed(1)
    model = moe_models.build(_standalone("decoder", zero_init_output=False)).eval()
    seen = {}
    model.layers[1].ffn.register_forward_hook(lambda m, a, out: seen.update(residual=out))
    block = model.layers[1].standalone
    block.layer.register_forward_hook(lambda m, a, out: seen.update(x=a[0], routed=out))
    block.register_forward_hook(lambda m, a, out: seen.update(out=out))
    model(torch.randint(0, 37, (2, 10)))
    torch.testing.assert_close(seen["x"], seen["residual"], rtol=0, atol=0)
    # not normalised: a LayerNorm's output would have per-token mean 0 and std 1
    assert seen["x"].std(-1).sub(1).abs().max() > 0.1
    torch.testing.assert_close(seen["out"], seen["residual"] + seen["routed"], rtol=0, atol=0)
    assert seen["routed"].abs().max() > 0


def test_standalone_config_round_trips_and_overrides():
    cfg = _standalone("transformer_xl")
    again = moe_models.config_from_dict(json.loads(json.dumps(moe_models.config_to_dict(cfg))))
    assert again == cfg
    assert moe_models.get_config(cfg, moe_placement="ffn").layer_ffn_config(1) == cfg.ffn
    assert moe_models.get_config("tiny-base", moe_placement="standalone").standalone_config(1)


def test_dense_twin_of_a_standalone_config_has_no_blocks():
    cfg = _standalone("decoder")
    twin = dense_twin(cfg)
    assert twin.moe_placement == "ffn"
    assert all(twin.standalone_config(i) is None for i in range(twin.n_layers))
    slack = 2 * (cfg.d_model + 1)
    assert abs(count_parameters(twin)["total"] - count_parameters(cfg)["total"]) <= slack
    compute = dense_twin(cfg, match="compute")
    assert abs(count_parameters(compute)["active"] - count_parameters(cfg)["active"]) <= slack


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(moe_placement="after"), "unknown moe_placement 'after'"),
        (dict(moe_placement=None), "unknown moe_placement None"),
    ],
)
def test_bad_moe_placement(overrides, message):
    with pytest.raises(ValueError, match=message):
        _standalone("decoder", **overrides)


def test_standalone_placement_needs_a_transformer():
    with pytest.raises(ValueError, match="moe_placement='standalone' needs arch"):
        moe_models.get_config("tiny-smlp", moe_placement="standalone")


def test_default_placement_is_the_ffn():
    cfg = moe_models.get_config("tiny-base")
    assert cfg.moe_placement == "ffn"
    assert ffn_name(cfg.layer_ffn_config(1)) == "base"
    model = moe_models.build(cfg)
    assert all(layer.standalone is None for layer in model.layers)


def test_fairseq_base_positions_are_fairseqs_sequential_inserts():
    # L = 24, n = 3: inserts at 6, 12 and 18 of the growing list follow layers 5, 10 and 15
    assert fairseq_base_positions(24, 3) == [5, 10, 15]
    assert fairseq_base_positions(12, 1) == [5]
    assert fairseq_base_positions(3, 2) == [0, 0]
    assert fairseq_base_positions(2, 3) == [None, None, None]


@given(n_layers=st.integers(1, 40), n=st.integers(1, 12))
def test_fairseq_base_positions_match_a_list_of_named_layers(n_layers, n):
    """The layer list as fairseq builds it (names, one insert per BASE layer), read back."""
    layers = [f"layer{j}" for j in range(n_layers)]
    for i in range(n):
        layers.insert(((i + 1) * n_layers) // (n + 1), f"base{i}")
    expected = []
    for i in range(n):
        before = layers[: layers.index(f"base{i}")]
        decoder = [name for name in before if name.startswith("layer")]
        expected.append(int(decoder[-1].removeprefix("layer")) if decoder else None)
    assert fairseq_base_positions(n_layers, n) == expected


@pytest.mark.parametrize("arch", ["transformer_xl", "decoder"])
def test_n_moe_layers_places_the_blocks_as_fairseq(arch):
    cfg = _standalone(arch, n_layers=8, n_moe_layers=3, moe_interval=2)
    # inserts at 2, 4 and 6 of the growing list: each counts the BASE layers before it
    assert [i for i in range(8) if cfg.is_moe_layer(i)] == [1, 2, 3]
    model = moe_models.build(cfg)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "StandaloneBlock"]
    assert blocks == ["layers.1.standalone", "layers.2.standalone", "layers.3.standalone"]
    assert count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())
    again = moe_models.config_from_dict(json.loads(json.dumps(moe_models.config_to_dict(cfg))))
    assert again == cfg
    one = _standalone(arch, n_layers=12, n_moe_layers=1)
    assert [i for i in range(12) if one.is_moe_layer(i)] == [5]
    # as the FFN of those layers too
    ffn = _standalone(arch, n_layers=8, n_moe_layers=3, moe_placement="ffn")
    names = [ffn_name(ffn.layer_ffn_config(i)) for i in range(8)]
    assert names == ["dense", "base", "base", "base", "dense", "dense", "dense", "dense"]


def test_dense_twin_with_n_moe_layers_keeps_the_dense_layers():
    cfg = _standalone("decoder", n_layers=8, n_moe_layers=2, moe_placement="ffn")
    twin = dense_twin(cfg)
    slack = 2 * (cfg.d_model + 1)
    assert abs(count_parameters(twin)["total"] - count_parameters(cfg)["total"]) <= slack
    assert twin.layer_ffn_config(0).d_ff == cfg.d_ff


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_moe_layers=0), "n_moe_layers must be None or an int >= 1, got 0"),
        (dict(n_moe_layers=True), "n_moe_layers must be None or an int >= 1, got True"),
        (dict(n_moe_layers=4), r"n_moe_layers=4 is too many for n_layers=4"),
    ],
)
def test_bad_n_moe_layers(overrides, message):
    with pytest.raises(ValueError, match=message):
        _standalone("decoder", **overrides)


def test_fairseqs_base_block_does_not_start_as_the_identity():
    """fairseq zero-initialises the output weight only: with expert biases the block adds
    σ(x.c_e) b2_e at initialisation."""
    torch.manual_seed(0)
    ffn = _base_ffn(zero_init_output=True, expert_norm=True, expert_bias=True)
    model = moe_models.build(_standalone("decoder", dropout=0.0, ffn=ffn)).eval()
    plain = moe_models.build(_standalone("decoder", dropout=0.0, moe_placement="ffn", ffn="dense"))
    plain.load_state_dict(model.state_dict(), strict=False)
    tokens = torch.randint(0, 37, (2, 10))
    assert not torch.allclose(model(tokens).logits, plain.eval()(tokens).logits)
