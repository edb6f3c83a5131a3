import dataclasses
import math

import moe_layers
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_layers import (
    PKM,
    Experts,
    MoEModule,
    SBaseMoE,
    SigmaMoE,
    SwitchMoE,
    TokenChoiceMoE,
    TopKFFN,
    collect_aux_losses,
    collect_routing_stats,
)
from moe_layers.base import reference_expert_mlp
from torch import nn


@given(
    n_tokens=st.integers(1, 12),
    d_model=st.integers(1, 7),
    n_experts=st.integers(1, 5),
    expert_size=st.integers(1, 6),
    k_frac=st.floats(0.0, 1.0),
    activation=st.sampled_from(["relu", "gelu", "silu"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_experts_fast_matches_reference(
    n_tokens, d_model, n_experts, expert_size, k_frac, activation, dtype, seed
):
    k = max(1, round(k_frac * n_experts))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(n_tokens, d_model, generator=gen, dtype=dtype)
    # k distinct experts per token, as a router picks them
    idx = torch.rand(n_tokens, n_experts, generator=gen).argsort(-1)[:, :k]
    # some slots dropped (gate 0), as a capacity limit leaves them
    gates = torch.rand(n_tokens, k, generator=gen, dtype=dtype) * (torch.rand(n_tokens, k) > 0.3)
    grads = {}
    for impl in ("fast", "reference"):
        layer = Experts(d_model, n_experts, expert_size, activation=activation, impl=impl)
        layer = layer.to(dtype)
        with torch.no_grad():
            layer.w1.copy_(torch.randn(layer.w1.shape, generator=torch.Generator().manual_seed(1)))
            layer.w2.copy_(torch.randn(layer.w2.shape, generator=torch.Generator().manual_seed(2)))
        xi = x.clone().requires_grad_(True)
        gi = gates.clone().requires_grad_(True)
        y = layer(xi, idx, gi)
        y.pow(2).sum().backward()
        grads[impl] = (y.detach(), xi.grad, gi.grad, layer.w1.grad, layer.w2.grad)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    for a, b in zip(grads["fast"], grads["reference"], strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_reference_expert_mlp_is_the_per_token_formula():
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)
    w1 = torch.randn(4, 3, 2, dtype=torch.float64)
    w2 = torch.randn(4, 2, 3, dtype=torch.float64)
    idx = torch.tensor([[0, 3], [3, 3], [1, 0], [2, 1], [0, 0]])
    gates = torch.rand(5, 2, dtype=torch.float64)
    y = reference_expert_mlp(x, w1, w2, idx, gates, "relu")
    for t in range(5):
        expected = sum(
            gates[t, j] * torch.relu(x[t] @ w1[idx[t, j]]) @ w2[idx[t, j]] for j in [0, 1]
        )
        torch.testing.assert_close(y[t], expected)


def test_collect_aux_losses_sums_per_name_over_layers():
    torch.manual_seed(1)
    model = nn.Sequential(
        SigmaMoE(4, 3, 2, 1, entropy_weight=1.0),
        SigmaMoE(4, 3, 2, 1, entropy_weight=2.0),
        SwitchMoE(4, 3, 2, load_balance_weight=0.5),
    ).train()
    model(torch.randn(6, 4))
    losses = collect_aux_losses(model)
    assert set(losses) == {"entropy", "switch_balance"}
    torch.testing.assert_close(
        losses["entropy"], model[0].aux_losses["entropy"] + model[1].aux_losses["entropy"]
    )
    torch.testing.assert_close(losses["switch_balance"], model[2].aux_losses["switch_balance"])
    assert set(collect_routing_stats(model)) == {"0", "1", "2"}
    model.eval()(torch.randn(6, 4))
    assert collect_aux_losses(model) == {}


def test_routing_stats_entropy_and_usage():
    m = MoEModule()
    m.record_routing_stats(torch.tensor([3, 1]), n_tokens=2, probs_TE=torch.eye(2))
    assert m.routing_stats.entropy == pytest.approx(math.log(2))
    torch.testing.assert_close(m.routing_stats.usage, torch.tensor([0.75, 0.25]))
    m.record_routing_stats(torch.tensor([3, 1]), n_tokens=4)
    assert m.routing_stats.entropy == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    )


def test_without_routing_stats_records_none_and_leaves_the_output():
    """Decoding skips the statistics (TokenChoiceMoE adds its bias to them); the output is the
    same, and recording resumes after."""
    torch.manual_seed(0)
    model = nn.Sequential(
        SigmaMoE(6, 4, 3, 2), TokenChoiceMoE(6, 4, 3, k=2, bias_update_rate=0.1)
    ).eval()
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        y = model(x)
        assert set(collect_routing_stats(model)) == {"0", "1"}
        with moe_layers.without_routing_stats():
            assert not moe_layers.records_routing_stats()
            torch.testing.assert_close(model(x), y, rtol=0, atol=0)
            assert collect_routing_stats(model) == {}
        assert moe_layers.records_routing_stats()
        model(x)
    assert set(collect_routing_stats(model)) == {"0", "1"}


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize(
    "make",
    [
        lambda impl: SigmaMoE(6, 4, 3, 2, entropy_weight=0.1, impl=impl),
        lambda impl: SwitchMoE(6, 4, 3, capacity_factor=1.0, impl=impl),
        lambda impl: SBaseMoE(6, 4, 3, 2, entropy_weight=0.1, impl=impl),
        lambda impl: TopKFFN(6, 8, 3, impl=impl),
        lambda impl: PKM(6, 3, 2, 4, impl=impl),
    ],
)
def test_empty_batch(make, impl):
    layer = make(impl).train()
    x = torch.randn(2, 0, 6, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape


ROUTED = [
    moe_layers.SigmaMoE,
    moe_layers.SBaseMoE,
    moe_layers.SwitchMoE,
    moe_layers.GShardMoE,
    moe_layers.BaseLayer,
    moe_layers.HashLayer,
    moe_layers.TMoE,
]
EXPERT_OPTIONS = {"activation": "relu", "dropout": 0.0, "n_layers": 1, "impl": "fast"}


@pytest.mark.parametrize("cls", ROUTED, ids=lambda c: c.__name__)
def test_the_routed_layers_describe_their_experts_with_experts_config(cls):
    assert issubclass(cls.Config, moe_layers.ExpertsConfig)
    fields = {f.name: f.default for f in dataclasses.fields(cls.Config)}
    assert {name: fields[name] for name in EXPERT_OPTIONS} == EXPERT_OPTIONS
    assert cls.Config.positional[:3] == ("d_model", "n_experts", "expert_size")


def test_topk_puts_k_after_the_sizes_and_a_wrong_base_order_fails_loudly():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Good(moe_layers.ExpertsConfig, moe_layers.TopK):
        own: int = 0

    names = [f.name for f in dataclasses.fields(Good)]
    assert names == ["d_model", "n_experts", "expert_size", "k", *EXPERT_OPTIONS, "own"]
    assert Good(d_model=4, n_experts=3, expert_size=2, k=2).slots == 2
    with pytest.raises(ValueError, match=r"k must be at most n_experts \(3\), got 4"):
        Good(d_model=4, n_experts=3, expert_size=2, k=4)
    with pytest.raises(ValueError, match="activation"):
        Good(d_model=4, n_experts=3, expert_size=2, k=1, activation="tanh")

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Swapped(moe_layers.TopK, moe_layers.ExpertsConfig):
        pass

    # k would follow the options: its positional slot is impossible, and the layer says so
    with pytest.raises(TypeError, match="positional fields"):

        class Layer(moe_layers.RoutedMoE):
            Config = Swapped


@given(
    d_model=st.integers(1, 9),
    n_experts=st.integers(1, 6),
    expert_size=st.integers(1, 7),
    k_frac=st.floats(0.0, 1.0),
)
def test_experts_config_counts_the_weights_experts_creates(d_model, n_experts, expert_size, k_frac):
    k = max(1, round(k_frac * n_experts))
    cfg = moe_layers.SigmaMoE.Config(
        d_model=d_model, n_experts=n_experts, expert_size=expert_size, k=k
    )
    with torch.device("meta"):
        experts = Experts(d_model, n_experts, expert_size)
    per_expert = sum(p[0].numel() for p in experts.parameters())
    gate = n_experts * d_model
    assert cfg.parameter_count() == moe_layers.ParameterCount(
        total=gate + sum(p.numel() for p in experts.parameters()),
        active=gate + k * per_expert,
    )


def test_experts_refuse_biases_with_a_gated_activation():
    with pytest.raises(ValueError, match="swiglu"):
        Experts(4, 2, 3, activation="swiglu", bias=True)
    biased = Experts(4, 2, 3, bias=True)
    assert [name for name, _ in biased.named_parameters()] == ["w1", "w2", "b1", "b2"]
