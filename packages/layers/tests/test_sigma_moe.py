import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_layers import SigmaMoE, collect_aux_losses
from torch.nn import functional as F


@st.composite
def sigma_config(draw):
    n_experts = draw(st.integers(1, 6))
    return dict(
        d_model=draw(st.integers(1, 9)),
        n_experts=n_experts,
        expert_size=draw(st.integers(1, 7)),
        k=draw(st.one_of(st.just(n_experts), st.integers(1, n_experts))),
        n_tokens=draw(st.one_of(st.just(1), st.integers(1, 20))),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        expert_dropout=draw(st.sampled_from([0.0, 0.3])),
        training=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@given(cfg=sigma_config(), data=st.data())
def test_fast_matches_reference(cfg, data, leading_shape, fast_vs_reference):
    shape = data.draw(leading_shape(cfg["n_tokens"]))
    x = torch.randn(*shape, cfg["d_model"], generator=torch.Generator().manual_seed(cfg["seed"]))

    def make(impl):
        return SigmaMoE(
            cfg["d_model"],
            cfg["n_experts"],
            cfg["expert_size"],
            cfg["k"],
            expert_dropout=cfg["expert_dropout"],
            entropy_weight=0.1,
            impl=impl,
        )

    fast_vs_reference(make, x.to(cfg["dtype"]), cfg["seed"], cfg["training"])


def test_one_token_leaves_other_experts_empty(fast_vs_reference):
    torch.manual_seed(0)
    x = torch.randn(1, 6, dtype=torch.float64)
    fast_vs_reference(lambda impl: SigmaMoE(6, 5, 3, 1, impl=impl), x, 0, False)


def test_eval_output_is_the_issue_formula():
    torch.manual_seed(1)
    layer = SigmaMoE(8, 5, 4, 2).double().eval()
    x = torch.randn(7, 8, dtype=torch.float64)
    y = layer(x)
    for t in range(7):
        scores = torch.sigmoid(layer.router.gate @ x[t])
        expected = sum(
            scores[e] * F.relu(x[t] @ layer.experts.w1[e]) @ layer.experts.w2[e]
            for e in scores.topk(2).indices
        )
        torch.testing.assert_close(y[t], expected)


def test_gates_are_not_renormalised():
    # with K = E every expert is used, so the output is the sigmoid-weighted sum over all experts
    torch.manual_seed(2)
    layer = SigmaMoE(4, 3, 2, 3).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    s = torch.sigmoid(x @ layer.router.gate.t())
    expected = sum(
        s[:, e : e + 1] * (F.relu(x @ layer.experts.w1[e]) @ layer.experts.w2[e]) for e in range(3)
    )
    torch.testing.assert_close(layer(x), expected)


def _set_logits(layer, logits):
    """Make x @ gate.T equal `logits` by taking x = logits and gate = I (d_model = n_experts)."""
    with torch.no_grad():
        layer.router.gate.copy_(torch.eye(layer.config.n_experts))
    return torch.as_tensor(logits, dtype=torch.float32)


def test_entropy_regulariser_uniform_and_skewed():
    layer = SigmaMoE(2, 2, 3, 1, entropy_weight=0.5).train()
    # p = softmax([ln 3, 0]) = (3/4, 1/4) for every token
    layer(_set_logits(layer, [[math.log(3.0), 0.0]] * 4))
    expected = 0.5 * (0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert collect_aux_losses(layer)["entropy"].item() == pytest.approx(expected, rel=1e-5)
    # two tokens confident in opposite experts average to uniform: -H = -ln 2
    layer(_set_logits(layer, [[5.0, -5.0], [-5.0, 5.0]]))
    assert collect_aux_losses(layer)["entropy"].item() == pytest.approx(-0.5 * math.log(2.0))


def test_entropy_recorded_only_in_training_and_differentiable():
    layer = SigmaMoE(6, 4, 3, 2, entropy_weight=1e-3)
    x = torch.randn(9, 6)
    layer.train()(x)
    loss = collect_aux_losses(layer)["entropy"]
    loss.backward()
    assert layer.router.gate.grad is not None and layer.router.gate.grad.abs().sum() > 0
    layer.eval()(x)
    assert collect_aux_losses(layer) == {}


def test_expert_dropout_rate():
    # K = E: every expert fills a slot, and exactly the removed ones get gate 0
    torch.manual_seed(3)
    delta, n_tokens, n_experts = 0.3, 500, 8
    layer = SigmaMoE(4, n_experts, 2, n_experts, expert_dropout=delta, impl="reference").train()
    x = torch.randn(n_tokens, 4)
    routing = layer.router(x)
    gates = routing.gates_TK
    n = n_tokens * n_experts
    rate = (gates == 0).float().mean().item()
    assert abs(rate - delta) < 6 * math.sqrt(delta * (1 - delta) / n)
    assert routing.counts_E.sum().item() == int((gates != 0).sum())
    layer.eval()
    assert (layer.router(x).gates_TK != 0).all()


def test_expert_dropout_changes_only_selection():
    # δ close to 1 with K = 1: whenever the top expert survives it is picked with its own score
    torch.manual_seed(4)
    layer = SigmaMoE(5, 6, 3, 1, expert_dropout=0.5).train()
    x = torch.randn(400, 5)
    logits = x @ layer.router.gate.t()
    routing = layer.router(x)
    idx, gates = routing.idx_TK, routing.gates_TK
    kept = gates[:, 0] != 0
    torch.testing.assert_close(gates[kept, 0], torch.sigmoid(logits.gather(1, idx)[kept, 0]))
    not_top = idx[:, 0] != logits.argmax(-1)
    assert 0.3 < not_top.float().mean().item() < 0.7


@pytest.mark.parametrize("n_layers", [1, 4])
def test_dense_equivalent_init(n_layers):
    torch.manual_seed(5)
    d_model, n_experts, expert_size = 96, 16, 32
    layer = SigmaMoE(d_model, n_experts, expert_size, 4, n_layers=n_layers)
    c = math.sqrt(2.0 / n_layers)
    # relative std error of a sample std is 1/sqrt(2N) <= 0.6% here; 4% is > 6 of those, while the
    # "expert_size" init is off by sqrt(16) = 4x
    for name, std in [
        ("experts.w1", c / math.sqrt(d_model)),
        ("experts.w2", c / math.sqrt(n_experts * expert_size)),
        ("router.gate", c / math.sqrt(d_model)),
    ]:
        w = layer.get_parameter(name)
        assert w.std().item() == pytest.approx(std, rel=0.04), name
        assert abs(w.mean().item()) < 6 * std / math.sqrt(w.numel()), name
    row_norms = layer.router.gate.norm(dim=-1)
    torch.testing.assert_close(row_norms, torch.full_like(row_norms, c))
    bad = SigmaMoE(d_model, n_experts, expert_size, 4, n_layers=n_layers, init="expert_size")
    assert bad.experts.w2.std().item() == pytest.approx(c / math.sqrt(expert_size), rel=0.04)


def test_routing_stats():
    layer = SigmaMoE(6, 5, 3, 2).eval()
    layer(torch.randn(2, 7, 6))
    stats = layer.routing_stats
    assert stats.n_tokens == 14 and stats.dropped == 0
    assert stats.expert_counts.sum().item() == 28
    assert 0 <= stats.entropy <= math.log(5) + 1e-6


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_hidden_dropout_only_in_training(impl):
    torch.manual_seed(6)
    dropped = SigmaMoE(6, 4, 16, 2, dropout=0.5, impl=impl).double()
    plain = SigmaMoE(6, 4, 16, 2).double()
    plain.load_state_dict(dropped.state_dict())
    x = torch.randn(10, 6, dtype=torch.float64)
    torch.testing.assert_close(dropped.eval()(x), plain.eval()(x))
    assert not torch.allclose(dropped.train()(x), plain.train()(x))


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(k=5), "k"),
        (dict(k=0), "k"),
        (dict(n_experts=0), "n_experts"),
        (dict(expert_size=-1), "expert_size"),
        (dict(d_model=0), "d_model"),
        (dict(activation="tanh"), "activation"),
        (dict(impl="cuda"), "impl"),
        (dict(init="xavier"), "init"),
        (dict(expert_dropout=1.0), "expert_dropout"),
        (dict(entropy_weight=-1.0), "entropy_weight"),
        (dict(n_layers=0), "n_layers"),
        (dict(dropout=-0.1), "dropout"),
    ],
)
def test_bad_configuration(kwargs, option):
    args = dict(d_model=8, n_experts=4, expert_size=3, k=2) | kwargs
    with pytest.raises(ValueError, match=option):
        SigmaMoE(**args)
