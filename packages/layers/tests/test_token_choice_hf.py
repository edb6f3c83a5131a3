"""TokenChoiceMoE configured as transformers' MoE blocks equals them, with copied weights.

Each reference is built from a tiny random config (nothing downloaded), its weights drawn at
random and copied into our layer; both run in float64 on the same input and give the same outputs
and input gradients. The references score their routers in float32 (`softmax(..., dtype=float)`,
DeepSeek-V3's float32 router weight), so the tolerance is float32's, not float64's.
"""

import pytest
import torch
from moe_layers import TokenChoiceMoE

transformers = pytest.importorskip("transformers")

D, G, S, E, K = 16, 8, 12, 8, 2
TOL = dict(rtol=1e-5, atol=1e-6)


def randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def copy_routed(ours: TokenChoiceMoE, gate_weight, experts) -> None:
    """Router [E, D]; their experts' gate_up_proj [E, 2G, D] (gate rows first), down_proj [E, D, G]."""
    with torch.no_grad():
        ours.router.gate.copy_(gate_weight)
        g = experts.gate_up_proj.shape[1] // 2
        ours.experts.w1.copy_(experts.gate_up_proj[:, :g].transpose(1, 2))
        ours.experts.w3.copy_(experts.gate_up_proj[:, g:].transpose(1, 2))
        ours.experts.w2.copy_(experts.down_proj.transpose(1, 2))


def copy_shared(ours: TokenChoiceMoE, mlp, gate=None) -> None:
    with torch.no_grad():
        ours.shared.w1.copy_(mlp.gate_proj.weight.t())
        ours.shared.w3.copy_(mlp.up_proj.weight.t())
        ours.shared.w2.copy_(mlp.down_proj.weight.t())
        if gate is not None:
            ours.shared.gate.copy_(gate.weight.t())


def assert_same(theirs: torch.nn.Module, ours: TokenChoiceMoE, seed: int) -> None:
    theirs, ours = theirs.double().eval(), ours.double().eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, D, generator=g, dtype=torch.float64)
    r = torch.randn(3, 5, D, generator=g, dtype=torch.float64)
    outs = []
    for module in (theirs, ours):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        (y * r).sum().backward()
        outs.append((y.detach(), xi.grad))
    (y_t, gx_t), (y_o, gx_o) = outs
    torch.testing.assert_close(y_o, y_t, **TOL)
    torch.testing.assert_close(gx_o, gx_t, **TOL)
    assert y_t.abs().max() > 0.1


def tiny(config_cls, **kwargs):
    return config_cls(hidden_size=D, hidden_act="silu", num_attention_heads=2, **kwargs)


@pytest.mark.parametrize("seed", [0, 1])
def test_mixtral(seed):
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock

    cfg = tiny(MixtralConfig, intermediate_size=G, num_local_experts=E, num_experts_per_tok=K)
    theirs = MixtralSparseMoeBlock(cfg)
    randomize(theirs, seed)
    ours = TokenChoiceMoE(D, E, G, k=K, activation="swiglu", softmax_after_topk=True)
    copy_routed(ours, theirs.gate.weight, theirs.experts)
    assert_same(theirs, ours, seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_olmoe(seed):
    from transformers.models.olmoe.modeling_olmoe import OlmoeConfig, OlmoeSparseMoeBlock

    cfg = tiny(OlmoeConfig, intermediate_size=G, num_experts=E, num_experts_per_tok=3)
    assert not cfg.norm_topk_prob
    theirs = OlmoeSparseMoeBlock(cfg)
    randomize(theirs, seed)
    ours = TokenChoiceMoE(D, E, G, k=3, normalize=False, z_loss_weight=1e-3)
    copy_routed(ours, theirs.gate.weight, theirs.experts)
    assert_same(theirs, ours, seed)


@pytest.mark.parametrize("norm", [False, True])
def test_qwen2_moe_with_its_gated_shared_expert(norm):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import (
        Qwen2MoeConfig,
        Qwen2MoeSparseMoeBlock,
    )

    cfg = tiny(
        Qwen2MoeConfig,
        moe_intermediate_size=G,
        shared_expert_intermediate_size=S,
        num_experts=E,
        num_experts_per_tok=K,
        norm_topk_prob=norm,
    )
    theirs = Qwen2MoeSparseMoeBlock(cfg)
    randomize(theirs, 3)
    ours = TokenChoiceMoE(
        D,
        E,
        G,
        k=K,
        normalize=norm,
        n_shared_experts=1,
        shared_expert_size=S,
        shared_expert_gate=True,
    )
    copy_routed(ours, theirs.gate.weight, theirs.experts)
    copy_shared(ours, theirs.shared_expert, theirs.shared_expert_gate)
    assert_same(theirs, ours, 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_qwen3_moe(seed):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import (
        Qwen3MoeConfig,
        Qwen3MoeSparseMoeBlock,
    )

    cfg = tiny(
        Qwen3MoeConfig,
        moe_intermediate_size=G,
        num_experts=E,
        num_experts_per_tok=4,
        norm_topk_prob=True,
    )
    theirs = Qwen3MoeSparseMoeBlock(cfg)
    randomize(theirs, seed)
    ours = TokenChoiceMoE(D, E, G, k=4, balance_loss_weight=0.01)
    copy_routed(ours, theirs.gate.weight, theirs.experts)
    assert_same(theirs, ours, seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_deepseek_v3(seed):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Config,
        DeepseekV3MoE,
    )

    n_shared, n_groups, topk_groups = 2, 4, 2
    cfg = tiny(
        DeepseekV3Config,
        moe_intermediate_size=G,
        n_routed_experts=E,
        n_shared_experts=n_shared,
        num_experts_per_tok=3,
        n_group=n_groups,
        topk_group=topk_groups,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    theirs = DeepseekV3MoE(cfg)
    randomize(theirs, seed)
    with torch.no_grad():
        # a bias large enough to change the choice: the test sees it used for selection only
        theirs.gate.e_score_correction_bias.copy_(
            torch.randn(E, generator=torch.Generator().manual_seed(seed + 7))
        )
    ours = TokenChoiceMoE(
        D,
        E,
        G,
        k=3,
        score="sigmoid",
        route_scale=2.5,
        n_groups=n_groups,
        topk_groups=topk_groups,
        n_shared_experts=n_shared,
        bias_update_rate=1e-3,
    )
    copy_routed(ours, theirs.gate.weight, theirs.experts)
    copy_shared(ours, theirs.shared_experts)
    with torch.no_grad():
        ours.router.expert_bias.copy_(theirs.gate.e_score_correction_bias)
    assert_same(theirs, ours, seed)
