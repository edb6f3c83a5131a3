import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_layers import SBaseMoE, collect_aux_losses
from moe_layers.sbase import sinkhorn_log


@st.composite
def sbase_config(draw):
    n_experts = draw(st.integers(1, 6))
    return dict(
        d_model=draw(st.integers(1, 9)),
        n_experts=n_experts,
        expert_size=draw(st.integers(1, 7)),
        k=draw(st.one_of(st.just(n_experts), st.integers(1, n_experts))),
        n_tokens=draw(st.one_of(st.just(1), st.integers(1, 20))),
        sinkhorn_iters=draw(st.integers(0, 4)),
        expert_dropout=draw(st.sampled_from([0.0, 0.3])),
        training=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        seed=draw(st.integers(0, 2**16)),
    )


@given(cfg=sbase_config(), data=st.data())
def test_fast_matches_reference(cfg, data, leading_shape, fast_vs_reference):
    shape = data.draw(leading_shape(cfg["n_tokens"]))
    gen = torch.Generator().manual_seed(cfg["seed"])
    x = torch.randn(*shape, cfg["d_model"], generator=gen, dtype=cfg["dtype"])

    def make(impl):
        return SBaseMoE(
            cfg["d_model"],
            cfg["n_experts"],
            cfg["expert_size"],
            cfg["k"],
            sinkhorn_iters=cfg["sinkhorn_iters"],
            expert_dropout=cfg["expert_dropout"],
            entropy_weight=0.01,
            impl=impl,
        )

    fast_vs_reference(make, x, cfg["seed"], cfg["training"])


def _numpy_sinkhorn(logits, n_iters):
    """Multiplicative Sinkhorn on exp(logits): scale columns to sum 1, then rows to sum 1."""
    p = np.exp(logits.astype(np.float64))
    for _ in range(n_iters):
        p = p / p.sum(0, keepdims=True)
        p = p / p.sum(1, keepdims=True)
    return p


@pytest.mark.parametrize("n_iters", [1, 3, 50])
def test_sinkhorn_matches_multiplicative_form(n_iters):
    rng = np.random.default_rng(n_iters)
    logits = rng.normal(size=(12, 4)) * 3
    got = sinkhorn_log(torch.tensor(logits), n_iters).exp().double().numpy()
    np.testing.assert_allclose(got, _numpy_sinkhorn(logits, n_iters), rtol=1e-5)


def test_sinkhorn_converges_to_balanced_assignment():
    logits = torch.randn(20, 5) * 2 + torch.tensor([3.0, 0, 0, 0, -3.0])
    p = sinkhorn_log(logits, 200).exp()
    torch.testing.assert_close(p.sum(1), torch.ones(20))
    torch.testing.assert_close(p.sum(0), torch.full((5,), 4.0), rtol=1e-3, atol=1e-3)


def _skewed(layer, n_tokens):
    """Every token prefers expert 0 (logit 2 + small noise) over expert 1 (logit 0)."""
    with torch.no_grad():
        layer.router.gate.copy_(torch.eye(2))
    x = torch.zeros(n_tokens, 2)
    x[:, 0] = 2.0 + torch.linspace(-0.5, 0.5, n_tokens)
    return x


def test_training_balances_and_inference_does_not():
    layer = SBaseMoE(2, 2, 3, 1, sinkhorn_iters=3)
    x = _skewed(layer, 10)
    layer.eval()(x)
    assert layer.routing_stats.expert_counts.tolist() == [10, 0]
    y_train = layer.train()(x)
    assert layer.routing_stats.expert_counts.tolist() == [5, 5]
    # tokens with the weakest preference for expert 0 are the ones moved, gated by sigmoid(0)
    logits = x @ layer.router.gate.t()
    for t in range(5):
        expected = (
            torch.sigmoid(logits[t, 1])
            * torch.relu(x[t] @ layer.experts.w1[1])
            @ layer.experts.w2[1]
        )
        torch.testing.assert_close(y_train[t], expected)


def test_entropy_aux_loss_uniform():
    layer = SBaseMoE(2, 2, 3, 1, entropy_weight=1.0).train()
    with torch.no_grad():
        layer.router.gate.zero_()
    layer(torch.randn(6, 2))
    assert collect_aux_losses(layer)["entropy"].item() == pytest.approx(-math.log(2.0))


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(k=5), "k"),
        (dict(n_experts=0), "n_experts"),
        (dict(sinkhorn_iters=-1), "sinkhorn_iters"),
        (dict(expert_dropout=-0.5), "expert_dropout"),
        (dict(entropy_weight=-1.0), "entropy_weight"),
        (dict(activation="swish"), "activation"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_bad_configuration(kwargs, option):
    with pytest.raises(ValueError, match=option):
        SBaseMoE(**(dict(d_model=8, n_experts=4, expert_size=3, k=2) | kwargs))
