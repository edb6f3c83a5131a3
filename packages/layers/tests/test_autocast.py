"""Every layer runs under bf16 autocast (as `moe-train --precision bf16` uses it) and stays close to
its fp32 output, forward and backward."""

import moe_layers
import pytest
import torch

D = 32


def make_layers():
    return {
        "dense": moe_layers.DenseFFN(D, 64),
        "sigma_moe": moe_layers.SigmaMoE(D, 4, 16, 2),
        "topk": moe_layers.TopKFFN(D, 64, 8),
        "pkm": moe_layers.PKM(D, n_keys=8, n_heads=2, knn=4),
        "switch": moe_layers.SwitchMoE(D, 4, 16, capacity_factor=1.5),
        "sbase": moe_layers.SBaseMoE(D, 4, 16, 2),
        "gshard": moe_layers.GShardMoE(D, 4, 16),
        "base": moe_layers.BaseLayer(D, 4, 16),
        "tmoe": moe_layers.TMoE(D, 4, 16),
        "token_choice": moe_layers.TokenChoiceMoE(
            D, 8, 8, 2, n_shared_experts=1, shared_expert_gate=True, bias_update_rate=1e-3
        ),
    }


@pytest.mark.parametrize("name", list(make_layers()))
def test_layer_runs_under_bf16_autocast(name):
    torch.manual_seed(0)
    layer = make_layers()[name].eval()
    x = torch.randn(3, 8, D)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.shape == x.shape
    # bf16 keeps 8 bits of mantissa; rounding may also flip a near-tie in a top-k selection for a
    # few tokens, so the mean error, not the max, is held to a few percent of the output's scale
    err = (y.float() - ref).abs().mean() / ref.abs().mean().clamp(min=1e-6)
    assert err < 0.1, f"{name}: relative error {err:.3g} under bf16 autocast"
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(x).float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
