"""The token-choice presets: their dense twins are the twin presets, and the layer is an FFN."""

import moe_layers
import moe_models
import pytest
import torch


@pytest.mark.parametrize("name", ["tiny-olmoe", "tiny-deepseek"])
@pytest.mark.parametrize("match", ["params", "compute"])
def test_twin_presets_are_the_dense_twins(name, match):
    cfg = moe_models.get_config(name)
    twin = moe_models.get_config(f"{name}-dense-{match}")
    assert moe_models.dense_twin(cfg, match) == twin
    assert twin.ffn.activation == "swiglu"
    counts, twin_counts = moe_models.count_parameters(cfg), moe_models.count_parameters(twin)
    key = "total" if match == "params" else "active"
    # within one SwiGLU unit (3 d_model + 2 parameters) per layer
    assert abs(counts[key] - twin_counts[key]) <= cfg.n_layers * (3 * cfg.d_model + 2)


def test_shared_experts_count_in_the_twins():
    with_shared = moe_models.get_config("tiny-deepseek")
    without = moe_models.get_config("tiny-deepseek", n_shared_experts=0)
    for match in ("params", "compute"):
        wider = moe_models.dense_twin(with_shared, match).d_ff
        assert wider > moe_models.dense_twin(without, match).d_ff


def test_deepseek_preset_holds_its_expert_bias():
    torch.manual_seed(0)
    model = moe_models.build(moe_models.get_config("tiny-deepseek", n_layers=1, seq_len=8))
    layers = [m for m in model.modules() if isinstance(m, moe_layers.TokenChoiceMoE)]
    assert layers and all(m.router.has_bias for m in layers)
    assert any(k.endswith("router.expert_bias") for k in model.state_dict())
