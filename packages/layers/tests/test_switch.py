import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_layers import SwitchMoE, collect_aux_losses


@given(
    d_model=st.integers(1, 9),
    n_experts=st.integers(1, 6),
    expert_size=st.integers(1, 7),
    n_tokens=st.one_of(st.just(1), st.integers(1, 20)),
    capacity_factor=st.sampled_from([None, 0.5, 1.0, 1.25]),
    eval_capacity_factor=st.sampled_from([None, 0.1, 0.5]),
    training=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_fast_matches_reference(
    d_model,
    n_experts,
    expert_size,
    n_tokens,
    capacity_factor,
    eval_capacity_factor,
    training,
    dtype,
    seed,
    data,
    leading_shape,
    fast_vs_reference,
):
    shape = data.draw(leading_shape(n_tokens))
    x = torch.randn(*shape, d_model, generator=torch.Generator().manual_seed(seed), dtype=dtype)

    def make(impl):
        return SwitchMoE(
            d_model,
            n_experts,
            expert_size,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            impl=impl,
        )

    fast_vs_reference(make, x, seed, training)


def _routed_to(layer, experts):
    """Inputs whose top-1 expert is experts[t], with p = (3/4, 1/4) for E = 2 (d_model = E)."""
    with torch.no_grad():
        layer.router.gate.copy_(torch.eye(layer.config.n_experts))
    x = torch.zeros(len(experts), layer.config.n_experts)
    x[torch.arange(len(experts)), torch.tensor(experts)] = math.log(3.0)
    return x


def test_capacity_formulas():
    # training: ceil(f * T / E); eval: ceil(f * T) with eval_capacity_factor f; None: no limit
    assert SwitchMoE(4, 4, 3, capacity_factor=1.25).train().router.capacity(10) == 4
    assert SwitchMoE(4, 4, 3, capacity_factor=1.25).eval().router.capacity(10) is None
    assert SwitchMoE(4, 4, 3).train().router.capacity(10) is None
    assert SwitchMoE(4, 4, 3, eval_capacity_factor=0.25).eval().router.capacity(10) == 3


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_capacity_drops_late_tokens_to_zero(impl):
    torch.manual_seed(0)
    # training mode: in eval, capacity_factor sets no limit (eval_capacity_factor does)
    layer = SwitchMoE(2, 2, 4, capacity_factor=1.0, impl=impl).train()
    with torch.no_grad():
        # positive first-layer weights: every routed token has a nonzero expert output
        layer.experts.w1.abs_()
    # capacity ceil(1.0 * 7 / 2) = 4: expert 0 gets 6 tokens (2 dropped), expert 1 gets 1
    experts = [0, 0, 1, 0, 0, 0, 0]
    x = _routed_to(layer, experts)
    y = layer(x)
    assert layer.routing_stats.dropped == 2
    assert layer.routing_stats.expert_counts.tolist() == [6, 1]
    assert (y[5:] == 0).all()
    uncapped = SwitchMoE(2, 2, 4, impl=impl).train()
    uncapped.load_state_dict(layer.state_dict())
    y_uncapped = uncapped(x)
    torch.testing.assert_close(y[:5], y_uncapped[:5])
    assert uncapped.routing_stats.dropped == 0
    assert (y_uncapped[5:] != 0).all()


def test_output_is_router_probability_times_expert():
    torch.manual_seed(0)
    layer = SwitchMoE(5, 3, 4).double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    p = torch.softmax(x @ layer.router.gate.t(), -1)
    for t in range(6):
        e = int(p[t].argmax())
        expected = p[t, e] * torch.relu(x[t] @ layer.experts.w1[e]) @ layer.experts.w2[e]
        torch.testing.assert_close(layer(x)[t], expected)


@pytest.mark.parametrize("variant, expected", [("switch", 2 * 0.75), ("csordas", 0.75 / 2)])
def test_balance_loss_value(variant, expected):
    # all tokens prefer expert 0 with p = (3/4, 1/4): f = (1, 0), P = (3/4, 1/4)
    layer = SwitchMoE(2, 2, 3, load_balance_weight=0.1, balance_variant=variant).train()
    layer(_routed_to(layer, [0, 0, 0, 0]))
    loss = collect_aux_losses(layer)["switch_balance"]
    assert loss.item() == pytest.approx(0.1 * expected, rel=1e-6)


def test_balance_loss_is_one_at_perfect_balance():
    layer = SwitchMoE(2, 2, 3, load_balance_weight=1.0).train()
    layer(_routed_to(layer, [0, 1, 1, 0]))
    assert collect_aux_losses(layer)["switch_balance"].item() == pytest.approx(1.0)
    layer.eval()(_routed_to(layer, [0, 1]))
    assert collect_aux_losses(layer) == {}


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(n_experts=0), "n_experts"),
        (dict(expert_size=0), "expert_size"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(eval_capacity_factor=-1.0), "eval_capacity_factor"),
        (dict(load_balance_weight=-1.0), "load_balance_weight"),
        (dict(balance_variant="gshard"), "balance_variant"),
        (dict(activation="elu"), "activation"),
        (dict(impl="cuda"), "impl"),
        (dict(init="orthogonal"), "init"),
    ],
)
def test_bad_configuration(kwargs, option):
    with pytest.raises(ValueError, match=option):
        SwitchMoE(**(dict(d_model=8, n_experts=4, expert_size=3) | kwargs))
