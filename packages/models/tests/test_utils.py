"""Parameter counts, FLOPs per token and dense twins."""

import moe_models
import pytest
import torch
from moe_models import count_parameters, dense_twin, ffn_name, flops_per_token
from moe_models.registry import BUILTIN_FFNS

TINY = [n for n in moe_models.presets() if n.startswith("tiny-")]


@pytest.mark.parametrize("name", TINY)
def test_counting_a_config_matches_counting_the_built_model(name):
    cfg = moe_models.get_config(name)
    built = moe_models.build(cfg)
    assert count_parameters(cfg) == count_parameters(built)
    assert count_parameters(cfg)["total"] == sum(p.numel() for p in built.parameters())


@pytest.mark.parametrize("n_experts", [3, 5, 17])
def test_analytic_expert_counts_are_exact(small, n_experts):
    """Routed layers are counted by their configs' formulas, without building them."""
    for ffn in ("sigma_moe", "switch", "gshard", "base", "hash", "tmoe"):
        options = (
            dict(n_experts=n_experts, k=2) if ffn == "sigma_moe" else dict(n_experts=n_experts)
        )
        cfg = small.config("decoder", ffn, **options)
        assert count_parameters(cfg)["total"] == sum(
            p.numel() for p in small("decoder", ffn, **options).parameters()
        )


def test_active_parameters_of_sigma_moe(small):
    cfg = small.config("transformer_xl", "sigma_moe", n_experts=6, expert_size=8, k=2)
    counts = count_parameters(cfg)
    # per layer, the 4 unselected experts (W1 and W2 each d x G) are inactive
    inactive = cfg.n_layers * 4 * 2 * cfg.d_model * 8
    assert counts["active"] == counts["total"] - inactive


@pytest.mark.parametrize("ffn", list(BUILTIN_FFNS))
def test_active_never_exceeds_total(small, ffn):
    counts = count_parameters(small.config("transformer_xl", ffn))
    assert 0 < counts["active"] <= counts["total"]
    assert (counts["active"] == counts["total"]) == (ffn == "dense")


def test_tied_embeddings_count_once():
    tied = count_parameters(moe_models.get_config("tiny-decoder-dense"))["total"]
    untied = count_parameters(moe_models.get_config("tiny-decoder-dense", tie_embeddings=False))
    assert untied["total"] - tied == 256 * 128


@pytest.mark.parametrize(
    "name",
    [
        "tiny-sigma-moe",
        "tiny-switch",
        "tiny-gshard",
        "tiny-pkm",
        "sigma-moe-wt103-small",
        "artetxe-moe-15b",
    ],
)
def test_parameter_twin_has_the_same_size(name):
    moe = moe_models.get_config(name)
    twin = dense_twin(moe, match="params")
    n_ffn = sum(ffn_name(moe.layer_ffn_config(i)) != "dense" for i in range(moe.n_layers))
    # each twin FFN is rounded to a whole hidden unit: within 2 d_model + 1 parameters per layer
    slack = n_ffn * (moe.d_model + 1)
    assert abs(count_parameters(twin)["total"] - count_parameters(moe)["total"]) <= slack
    assert all(ffn_name(twin.layer_ffn_config(i)) == "dense" for i in range(twin.n_layers))


@pytest.mark.parametrize(
    "moe,dense",
    [
        ("tiny-sigma-moe", "tiny-dense"),
        ("sigma-moe-wt103-small", "dense-wt103-small"),
        ("sigma-moe-wt103-big", "dense-wt103-big"),
        ("sigma-moe-enwik8", "dense-enwik8"),
    ],
)
def test_dense_presets_are_the_parameter_twins_of_the_sigma_moe_presets(moe, dense):
    """The paper's d_ff may round the other way (4110 for 4109.5 in WT103 big)."""
    twin = dense_twin(moe_models.get_config(moe))
    assert abs(twin.ffn.d_ff - moe_models.get_config(dense).ffn.d_ff) <= 1


@pytest.mark.parametrize("name", ["tiny-sigma-moe", "tiny-gshard", "artetxe-moe-15b"])
def test_compute_twin_has_the_same_active_parameters_and_flops(name):
    moe = moe_models.get_config(name)
    twin = dense_twin(moe, match="compute")
    a, b = count_parameters(moe)["active"], count_parameters(twin)["active"]
    assert abs(a - b) / a < 0.01
    assert abs(flops_per_token(moe) - flops_per_token(twin)) / flops_per_token(moe) < 0.01
    assert count_parameters(twin)["total"] < count_parameters(moe)["total"]


def test_dense_twin_rejects_unknown_match():
    with pytest.raises(ValueError, match="match must be"):
        dense_twin(moe_models.get_config("tiny-sigma-moe"), match="memory")


def test_flops_of_a_dense_decoder_match_torch_flop_counter():
    """torch's counter sees the matmuls (attention over the full square: no causal saving)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = moe_models.get_config("tiny-decoder-dense", seq_len=32, dropout=0.0)
    model = moe_models.build(cfg).eval()
    tokens = torch.zeros(1, cfg.seq_len, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens)
    measured = counter.get_total_flops() / cfg.seq_len
    inner = cfg.n_heads * cfg.head_dim
    causal_saving = cfg.n_layers * 2 * 2 * inner * (cfg.seq_len - (cfg.seq_len + 1) / 2)
    assert abs(flops_per_token(cfg) + causal_saving - measured) / measured < 0.01


def test_moe_needs_fewer_flops_than_its_parameter_twin():
    moe = moe_models.get_config("sigma-moe-wt103-small")
    assert flops_per_token(moe) < 0.75 * flops_per_token(dense_twin(moe))
