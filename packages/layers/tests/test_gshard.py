import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_layers import GShardMoE, collect_aux_losses, collect_routing_stats
from moe_layers.gshard import top2_gating
from torch.nn import functional as F


@st.composite
def gshard_config(draw):
    return dict(
        d_model=draw(st.integers(1, 9)),
        n_experts=draw(st.integers(1, 6)),
        expert_size=draw(st.integers(1, 7)),
        n_tokens=draw(st.one_of(st.just(1), st.integers(1, 20))),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        second_policy=draw(st.sampled_from(["sampling", "all", "random"])),
        capacity_factor=draw(st.sampled_from([None, 0.25, 0.5, 1.0, 2.0])),
        eval_capacity_factor=draw(st.sampled_from([None, 0.1, 0.5])),
        normalize_after_drop=draw(st.booleans()),
        gate_noise=draw(st.sampled_from([0.0, 0.5])),
        training=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@given(cfg=gshard_config(), data=st.data())
def test_fast_matches_reference(cfg, data, leading_shape, fast_vs_reference):
    shape = data.draw(leading_shape(cfg["n_tokens"]))
    x = torch.randn(*shape, cfg["d_model"], generator=torch.Generator().manual_seed(cfg["seed"]))

    def make(impl):
        return GShardMoE(
            cfg["d_model"],
            cfg["n_experts"],
            cfg["expert_size"],
            second_policy=cfg["second_policy"],
            capacity_factor=cfg["capacity_factor"],
            eval_capacity_factor=cfg["eval_capacity_factor"],
            normalize_after_drop=cfg["normalize_after_drop"],
            gate_noise=cfg["gate_noise"],
            impl=impl,
        )

    fast_vs_reference(make, x.to(cfg["dtype"]), cfg["seed"], cfg["training"])


def queue_oracle(e1, e2, capacity, n_experts):
    """Kept flags of the first and second slots, filling each expert's buffer token by token with
    all first choices before any second choice."""
    filled = [0] * n_experts
    keep1, keep2 = [], []
    for e in e1:
        keep1.append(filled[e] < capacity)
        filled[e] += 1
    for e in e2:
        keep2.append(filled[e] < capacity)
        filled[e] += 1
    return torch.tensor(keep1), torch.tensor(keep2)


@given(
    n_tokens=st.integers(1, 30),
    n_experts=st.integers(2, 6),
    capacity=st.one_of(st.none(), st.integers(1, 8)),
    normalize_after_drop=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_capacity_drops_in_token_order(n_tokens, n_experts, capacity, normalize_after_drop, seed):
    logits = torch.randn(n_tokens, n_experts, generator=torch.Generator().manual_seed(seed)) * 3
    idx, gates, probs, counts, dropped = top2_gating(
        logits, capacity, "all", normalize_after_drop, stochastic=False
    )
    order = logits.argsort(dim=1, descending=True)
    assert torch.equal(idx, order[:, :2])
    limit = math.inf if capacity is None else capacity
    keep1, keep2 = queue_oracle(idx[:, 0].tolist(), idx[:, 1].tolist(), limit, n_experts)
    assert torch.equal(gates[:, 0] > 0, keep1)
    assert torch.equal(gates[:, 1] > 0, keep2)
    assert int(dropped) == int((~keep1).sum() + (~keep2).sum())
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=n_experts))
    g = probs.gather(1, idx)
    if normalize_after_drop:
        kept = torch.stack([keep1, keep2], 1) * g
        expected = kept / kept.sum(1, keepdim=True).clamp(min=torch.finfo(g.dtype).eps)
    else:
        expected = g / g.sum(1, keepdim=True) * torch.stack([keep1, keep2], 1)
    torch.testing.assert_close(gates, expected)


def test_capacity_formulas():
    layer = GShardMoE(4, 4, 3)
    # fairseq: training C = 2 * ceil(S / E); eval C = ceil(f * S); None: no limit
    assert layer.train().router.capacity(10) == 2 * 3
    assert GShardMoE(4, 4, 3, capacity_factor=1.5).router.capacity(10) == 9
    assert GShardMoE(4, 4, 3, capacity_factor=None).router.capacity(10) is None
    assert layer.eval().router.capacity(10) is None
    assert GShardMoE(4, 4, 3, eval_capacity_factor=0.25).eval().router.capacity(10) == 3


def test_dropping_counts_in_stats_and_output():
    torch.manual_seed(0)
    layer = GShardMoE(6, 3, 4, second_policy="all", eval_capacity_factor=0.1).double().eval()
    x = torch.randn(20, 6, dtype=torch.float64)
    y = layer(x)
    stats = collect_routing_stats(layer)[""]
    capacity = math.ceil(0.1 * 20)
    assert stats.n_tokens == 20
    assert stats.expert_counts.sum() == 40
    assert stats.dropped == 40 - int(
        torch.minimum(stats.expert_counts, torch.tensor(capacity)).sum()
    )
    # a token with both slots dropped gets no output at all
    idx, gates, *_ = top2_gating(x @ layer.router.gate.t(), capacity, "all", True, stochastic=False)
    none_kept = (gates == 0).all(1)
    assert none_kept.any()
    assert torch.all(y[none_kept] == 0)


def test_eval_output_is_the_formula():
    torch.manual_seed(2)
    layer = GShardMoE(5, 4, 3, second_policy="all", capacity_factor=4.0).double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = layer(x)
    for t in range(6):
        p = torch.softmax(layer.router.gate @ x[t], 0)
        top = p.topk(2).indices
        w = p[top] / p[top].sum()
        expected = sum(
            w[j] * F.relu(x[t] @ layer.experts.w1[e]) @ layer.experts.w2[e]
            for j, e in enumerate(top)
        )
        torch.testing.assert_close(y[t], expected)


def test_random_policy_keeps_second_with_probability_twice_its_gate():
    torch.manual_seed(3)
    n = 6000
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(n, 4)
    p = torch.softmax(logits[0], 0)
    idx, gates, *_ = top2_gating(logits, 10 * n, "random", True, stochastic=True)
    rate = (gates[:, 1] > 0).float().mean().item()
    expected = min(1.0, 2 * p[1].item())
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    assert torch.all(idx[:, 1] == 1)


def test_sampling_policy_draws_second_from_the_softmax_of_the_others():
    torch.manual_seed(4)
    n = 6000
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).expand(n, 4)
    idx, *_ = top2_gating(logits, 10 * n, "sampling", True, stochastic=True)
    freq = torch.bincount(idx[:, 1], minlength=4).float() / n
    p = torch.softmax(logits[0, 1:], 0)
    assert freq[0] == 0
    for j in range(3):
        assert abs(freq[j + 1] - p[j]) < 4 * math.sqrt(p[j] * (1 - p[j]) / n)


def test_balance_loss_is_the_gshard_formula():
    torch.manual_seed(5)
    layer = GShardMoE(6, 5, 3, load_balance_weight=0.3).double().train()
    x = torch.randn(11, 6, dtype=torch.float64)
    layer(x)
    aux = collect_aux_losses(layer)["gshard_balance"]
    p = torch.softmax(x @ layer.router.gate.t(), -1)
    top1 = p.argmax(-1)
    expected = 0
    for e in range(5):
        frac = (top1 == e).double().mean()
        expected = expected + p[:, e].mean() * frac
    torch.testing.assert_close(aux, 0.3 * 5 * expected)
    aux.backward()
    assert layer.router.gate.grad is not None and layer.router.gate.grad.abs().sum() > 0
    assert layer.experts.w1.grad is None
    layer.eval()
    layer(x)
    assert collect_aux_losses(layer) == {}


def test_accepts_token_ids_and_ignores_them():
    torch.manual_seed(6)
    layer = GShardMoE(4, 3, 2, second_policy="all").eval()
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(layer(x), layer(x, token_ids=torch.zeros(2, 3, dtype=torch.long)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(second_policy="top3"), "second_policy"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(eval_capacity_factor=-0.5), "eval_capacity_factor"),
        (dict(load_balance_weight=-1.0), "load_balance_weight"),
        (dict(gate_noise=-0.1), "gate_noise"),
        (dict(activation="tanh"), "activation"),
        (dict(impl="cuda"), "impl"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GShardMoE(4, 3, 2, **kwargs)


def test_bad_input_width():
    with pytest.raises(ValueError, match="d_model"):
        GShardMoE(4, 3, 2)(torch.randn(2, 5))


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(training):
    layer = GShardMoE(4, 3, 2).train(training)
    x = torch.randn(2, 0, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert layer.routing_stats.n_tokens == 0 and layer.routing_stats.expert_counts.sum() == 0
