import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_layers import BaseLayer, balanced_assignment, collect_aux_losses, collect_routing_stats
from scipy.optimize import linear_sum_assignment
from torch.nn import functional as F


def scipy_optimum(scores: torch.Tensor) -> float:
    """Best total score with at most ceil(T/E) tokens per expert: every expert repeated cap times
    as columns of a rectangular assignment problem."""
    n_tokens, n_experts = scores.shape
    cap = math.ceil(n_tokens / n_experts)
    cost = np.repeat(scores.double().numpy(), cap, axis=1)
    rows, cols = linear_sum_assignment(cost, maximize=True)
    return float(cost[rows, cols].sum())


@given(
    n_tokens=st.integers(1, 40),
    n_experts=st.integers(1, 7),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_balanced_assignment_is_optimal(n_tokens, n_experts, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_tokens, n_experts, generator=gen)
    if ties:
        # few distinct values: many optimal assignments, and bids that tie
        scores = torch.randint(0, 3, (n_tokens, n_experts), generator=gen).float()
    assignment = balanced_assignment(scores)
    assert assignment.shape == (n_tokens,) and assignment.dtype == torch.long
    counts = torch.bincount(assignment, minlength=n_experts)
    cap = math.ceil(n_tokens / n_experts)
    assert counts.max() <= cap
    if n_tokens % n_experts == 0:
        assert torch.all(counts == cap)
    total = float(scores.double()[torch.arange(n_tokens), assignment].sum())
    assert total == pytest.approx(scipy_optimum(scores), abs=1e-6)


def test_balanced_assignment_eps_bound():
    torch.manual_seed(0)
    scores = torch.randn(30, 4)
    eps = 0.05
    total = float(scores.double()[torch.arange(30), balanced_assignment(scores, eps=eps)].sum())
    assert scipy_optimum(scores) - 30 * eps <= total <= scipy_optimum(scores) + 1e-9


@given(
    d_model=st.integers(1, 8),
    n_experts=st.integers(1, 5),
    expert_size=st.integers(1, 6),
    n_tokens=st.one_of(st.just(1), st.integers(1, 18)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    training=st.booleans(),
    train_routing=st.sampled_from(["balanced", "greedy"]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_fast_matches_reference(
    d_model,
    n_experts,
    expert_size,
    n_tokens,
    dtype,
    training,
    train_routing,
    seed,
    data,
    leading_shape,
    fast_vs_reference,
):
    shape = data.draw(leading_shape(n_tokens))
    x = torch.randn(*shape, d_model, generator=torch.Generator().manual_seed(seed)).to(dtype)

    def make(impl):
        return BaseLayer(d_model, n_experts, expert_size, train_routing=train_routing, impl=impl)

    fast_vs_reference(make, x, seed, training)


def test_training_routes_balanced_and_eval_greedy():
    torch.manual_seed(1)
    layer = BaseLayer(6, 4, 3).double()
    # tokens all close to one centroid: greedy routing would send them all to that expert
    x = layer.router.gate[2].detach() * 50 + 0.01 * torch.randn(12, 6, dtype=torch.float64)
    layer.train()(x)
    assert torch.equal(collect_routing_stats(layer)[""].expert_counts, torch.full((4,), 3))
    assert collect_aux_losses(layer) == {}
    layer.eval()(x)
    greedy = torch.bincount((x @ layer.router.gate.t()).argmax(-1), minlength=4)
    assert torch.equal(collect_routing_stats(layer)[""].expert_counts, greedy)


def test_eval_output_is_the_formula():
    torch.manual_seed(2)
    layer = BaseLayer(5, 3, 4).double().eval()
    x = torch.randn(7, 5, dtype=torch.float64)
    y = layer(x)
    for t in range(7):
        a = layer.router.gate @ x[t]
        e = a.argmax()
        expected = torch.sigmoid(a[e]) * F.relu(x[t] @ layer.experts.w1[e]) @ layer.experts.w2[e]
        torch.testing.assert_close(y[t], expected)


def test_centroids_learn_through_the_sigmoid_gate():
    torch.manual_seed(3)
    layer = BaseLayer(5, 3, 4).train()
    layer(torch.randn(9, 5)).pow(2).sum().backward()
    assert layer.router.gate.grad is not None and layer.router.gate.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(train_routing="sinkhorn"), "train_routing"),
        (dict(activation="tanh"), "activation"),
        (dict(impl="x"), "impl"),
        (dict(n_layers=0), "n_layers"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BaseLayer(4, 3, 2, **kwargs)


def test_bad_sizes():
    with pytest.raises(ValueError, match="n_experts"):
        BaseLayer(4, 0, 2)
    with pytest.raises(ValueError, match="d_model"):
        BaseLayer(4, 3, 2)(torch.randn(3, 5))


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(training):
    layer = BaseLayer(4, 3, 2).train(training)
    x = torch.randn(0, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert layer.routing_stats.n_tokens == 0


@given(
    d_model=st.integers(1, 7),
    n_experts=st.integers(1, 5),
    expert_size=st.integers(1, 6),
    n_tokens=st.one_of(st.just(1), st.integers(1, 14)),
    training=st.booleans(),
    dropout=st.sampled_from([0.0, 0.3]),
    expert_norm=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_expert_biases_fast_matches_reference(
    d_model,
    n_experts,
    expert_size,
    n_tokens,
    training,
    dropout,
    expert_norm,
    seed,
    data,
    leading_shape,
    fast_vs_reference,
):
    shape = data.draw(leading_shape(n_tokens))
    x = torch.randn(*shape, d_model, generator=torch.Generator().manual_seed(seed))

    def make(impl):
        return BaseLayer(
            d_model,
            n_experts,
            expert_size,
            expert_bias=True,
            expert_norm=expert_norm,
            dropout=dropout,
            impl=impl,
        )

    # dropout draws its masks in another order on each path: an elementwise stand-in, a function
    # of the value, drops the same hidden units on both
    def value_dropout(u, p=0.5, training=True, inplace=False):
        return u * (torch.cos(u * 1e3) > 2 * p - 1) / (1 - p) if training and p > 0 else u

    with mock.patch.object(F, "dropout", value_dropout):
        fast_vs_reference(make, x.double(), seed, training)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_eval_output_with_expert_biases_is_the_formula(impl):
    torch.manual_seed(4)
    layer = BaseLayer(5, 3, 4, expert_bias=True, expert_norm=True, impl=impl).double().eval()
    with torch.no_grad():
        layer.expert_norm.weight.uniform_(0.5, 1.5)
        layer.expert_norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(7, 5, dtype=torch.float64)
    y = layer(x)
    ex = layer.experts
    for t in range(7):
        a = layer.router.gate @ x[t]
        e = a.argmax()
        h = F.layer_norm(x[t], (5,), layer.expert_norm.weight[e], layer.expert_norm.bias[e])
        ffn = F.relu(h @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]
        torch.testing.assert_close(y[t], torch.sigmoid(a[e]) * ffn)


def test_zero_init_output_zeroes_the_output_weight_only():
    """As fairseq's BASE sublayer: ff2.weight = 0, ff2.bias keeps a Linear's init, so the block
    does not start as the identity (the layer outputs σ(x.c_e) b2_e); without biases it outputs 0."""
    torch.manual_seed(5)
    d_model, expert_size = 6, 9
    layer = BaseLayer(d_model, 3, expert_size, expert_bias=True, zero_init_output=True).eval()
    ex = layer.experts
    assert torch.count_nonzero(ex.w2) == 0
    assert torch.count_nonzero(ex.b2) == ex.b2.numel()
    assert ex.b2.abs().max() <= expert_size**-0.5
    assert ex.b1.abs().max() <= d_model**-0.5
    x = torch.randn(8, d_model)
    a = x @ layer.router.gate.t()
    e = a.argmax(-1)
    expected = torch.sigmoid(a.gather(1, e[:, None])) * ex.b2[e]
    torch.testing.assert_close(layer(x), expected)
    assert layer(x).abs().sum() > 0
    no_bias = BaseLayer(d_model, 3, expert_size, zero_init_output=True).eval()
    assert torch.count_nonzero(no_bias(x)) == 0


def test_expert_biases_are_counted_and_in_the_state_dict():
    cfg = BaseLayer.Config(d_model=6, n_experts=3, expert_size=4, expert_bias=True)
    layer = cfg.build()
    assert {"experts.b1", "experts.b2"} <= layer.state_dict().keys()
    assert layer.experts.b1.shape == (3, 4) and layer.experts.b2.shape == (3, 6)
    count = cfg.parameter_count()
    assert count.total == sum(p.numel() for p in layer.parameters())
    plain = BaseLayer.Config(d_model=6, n_experts=3, expert_size=4).parameter_count()
    assert count.active - plain.active == 4 + 6
    with pytest.raises(ValueError, match="expert_bias"):
        BaseLayer(6, 3, 4, expert_bias=1)
