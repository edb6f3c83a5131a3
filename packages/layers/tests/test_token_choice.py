"""TopKRouter and TokenChoiceMoE: router properties, the losses against hand formulas, the expert
bias (selection only, no gradient, its update, the global-batch load), fast vs reference."""

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from moe_layers import (
    TokenChoiceMoE,
    TopKRouter,
    after_optimizer_step,
    collect_routing_stats,
)
from moe_layers.router import balance_loss, router_z_loss
from torch import nn


@st.composite
def router_setup(draw):
    n_groups = draw(st.sampled_from([1, 2, 3]))
    per_group = draw(st.integers(1, 4))
    n_experts = n_groups * per_group
    topk_groups = draw(st.integers(1, n_groups))
    k = draw(st.integers(1, topk_groups * per_group))
    score = draw(st.sampled_from(["softmax", "sigmoid"]))
    return (
        dict(
            d_model=draw(st.integers(1, 6)),
            n_experts=n_experts,
            k=k,
            score=score,
            softmax_after_topk=score == "softmax" and draw(st.booleans()),
            normalize=draw(st.booleans()),
            route_scale=draw(st.sampled_from([1.0, 2.5])),
            n_groups=n_groups,
            topk_groups=topk_groups,
            bias_update_rate=draw(st.sampled_from([None, 0.0, 0.1])),
        ),
        draw(st.integers(0, 12)),
        draw(st.integers(0, 2**16)),
    )


def make_router(cfg, seed, bias_scale=1.0):
    torch.manual_seed(seed)
    router = TopKRouter(**cfg).double()
    nn.init.normal_(router.gate)
    if router.has_bias:
        with torch.no_grad():
            router.expert_bias.normal_(std=bias_scale)
    return router


@given(setup=router_setup())
def test_k_distinct_experts_within_the_best_groups(setup):
    cfg, n_tokens, seed = setup
    router = make_router(cfg, seed)
    x = torch.randn(n_tokens, cfg["d_model"], dtype=torch.float64)
    routing = router(x)
    idx = routing.idx_TK
    assert idx.shape == (n_tokens, cfg["k"])
    assert all(len(set(row.tolist())) == cfg["k"] for row in idx)
    assert routing.counts_E.sum() == n_tokens * cfg["k"]
    # the groups kept, by hand: each group's two best choice scores summed, the best groups kept
    logits = x @ router.gate.t()
    scores = logits.softmax(-1) if cfg["score"] == "softmax" else logits.sigmoid()
    choice = scores + (router.expert_bias if router.has_bias else 0)
    size = cfg["n_experts"] // cfg["n_groups"]
    for t in range(n_tokens):
        groups = [
            sorted(choice[t, g * size : (g + 1) * size].tolist())[-2:]
            for g in range(cfg["n_groups"])
        ]
        group_score = torch.tensor([sum(g) for g in groups])
        kept = set(group_score.topk(cfg["topk_groups"]).indices.tolist())
        assert {e // size for e in idx[t].tolist()} <= kept


@given(setup=router_setup())
def test_gates_are_the_chosen_scores_renormalised_and_scaled(setup):
    cfg, n_tokens, seed = setup
    router = make_router(cfg, seed, bias_scale=10.0)
    x = torch.randn(n_tokens, cfg["d_model"], dtype=torch.float64)
    routing = router(x)
    logits = x @ router.gate.t()
    if cfg["softmax_after_topk"]:
        expected = logits.gather(1, routing.idx_TK).softmax(-1)
    else:
        scores = logits.softmax(-1) if cfg["score"] == "softmax" else logits.sigmoid()
        expected = scores.gather(1, routing.idx_TK)
        if cfg["normalize"]:
            expected = expected / expected.sum(-1, keepdim=True)
    expected = expected * cfg["route_scale"]
    torch.testing.assert_close(routing.gates_TK, expected)
    if cfg["normalize"] or cfg["softmax_after_topk"]:
        sums = routing.gates_TK.sum(-1)
        torch.testing.assert_close(sums, torch.full_like(sums, cfg["route_scale"]))


@given(setup=router_setup(), expert=st.integers(0, 11))
def test_the_bias_changes_the_choice_not_the_gates_and_gets_no_gradient(setup, expert):
    cfg, n_tokens, seed = setup
    cfg = {**cfg, "bias_update_rate": 0.0, "n_groups": 1, "topk_groups": 1}
    router = make_router(cfg, seed, bias_scale=0.0)
    expert %= cfg["n_experts"]
    x = torch.randn(n_tokens, cfg["d_model"], dtype=torch.float64)
    plain = router(x)
    with torch.no_grad():
        router.expert_bias[expert] = 100.0
    router.expert_bias.requires_grad_(True)
    biased = router(x)
    # a large bias puts its expert into every token's choice ...
    assert (biased.idx_TK == expert).any(-1).all()
    # ... and gates are still the unbiased scores of the chosen experts
    logits = x @ router.gate.t()
    scores = logits.softmax(-1) if cfg["score"] == "softmax" else logits.sigmoid()
    if not cfg["softmax_after_topk"] and not cfg["normalize"]:
        expected = scores.gather(1, biased.idx_TK) * cfg["route_scale"]
        torch.testing.assert_close(biased.gates_TK, expected)
    if n_tokens:
        (grad,) = torch.autograd.grad(biased.gates_TK.sum(), router.expert_bias, allow_unused=True)
        assert grad is None
    assert "expert_bias" not in dict(router.named_parameters())
    assert "expert_bias" in router.state_dict()
    if cfg["k"] < cfg["n_experts"] and n_tokens and not (plain.idx_TK == expert).any(-1).all():
        assert not torch.equal(plain.idx_TK, biased.idx_TK)


@given(
    load=st.lists(st.integers(0, 50), min_size=1, max_size=10),
    rate=st.sampled_from([1e-3, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_the_update_is_the_sign_rule_recentred(load, rate, seed):
    E = len(load)
    router = TopKRouter(3, E, k=1, bias_update_rate=rate).double()
    with torch.no_grad():
        router.expert_bias.normal_(generator=torch.Generator().manual_seed(seed))
        router.expert_bias -= router.expert_bias.mean()
    before = router.expert_bias.clone()
    router.pending_load = torch.tensor(load)
    router.after_optimizer_step()
    step = router.expert_bias - before
    load_t = torch.tensor(load, dtype=torch.float64)
    expected = rate * torch.sign(load_t.mean() - load_t)
    torch.testing.assert_close(step, expected - expected.mean())
    assert abs(float(router.expert_bias.mean())) < 1e-12
    # an expert with more load than another gets a smaller bias step (toward the mean load)
    for e in range(E):
        for f in range(E):
            if load[e] > load[f]:
                assert step[e] <= step[f] + 1e-12
    assert router.pending_load is None and torch.equal(router.last_load, torch.tensor(load))


def test_repeated_updates_balance_a_skewed_batch():
    torch.manual_seed(0)
    router = TopKRouter(8, 8, k=2, score="sigmoid", bias_update_rate=0.01).double()
    nn.init.normal_(router.gate)
    x = torch.randn(512, 8, dtype=torch.float64) + 1.0  # a shared offset skews the scores
    imbalance = []
    for _ in range(100):
        counts = router.train()(x).counts_E.double()
        imbalance.append(float(counts.max() / counts.mean()))
        router.after_optimizer_step()
    assert imbalance[0] > 2.0
    assert imbalance[-1] < 1.3
    assert abs(float(router.expert_bias.mean())) < 1e-12


def test_the_load_is_summed_over_micro_batches_in_training_only():
    torch.manual_seed(0)
    layer = TokenChoiceMoE(6, 5, 3, k=2, bias_update_rate=0.1)
    micro = [torch.randn(7, 6), torch.randn(2, 4, 6)]
    counts = []
    for x in micro:
        layer.train()(x)
        counts.append(layer.routing_stats.expert_counts)
    layer.eval()(torch.randn(9, 6))
    torch.testing.assert_close(layer.router.pending_load, counts[0] + counts[1])
    after_optimizer_step(layer)
    torch.testing.assert_close(layer.router.last_load, counts[0] + counts[1])
    # one micro-batch, one rank: the load the bias sees is the batch's own
    layer.train()(micro[0])
    stats = collect_routing_stats(layer)[""]
    after_optimizer_step(layer)
    torch.testing.assert_close(layer.router.last_load, stats.expert_counts)


def test_z_and_balance_losses_against_hand_formulas():
    torch.manual_seed(0)
    E, K, T = 5, 2, 9
    layer = TokenChoiceMoE(
        4, E, 3, k=K, z_loss_weight=0.3, balance_loss_weight=0.7, activation="relu"
    ).double()
    x = torch.randn(T, 4, dtype=torch.float64)
    layer.train()(x)
    logits = (x @ layer.router.gate.t()).tolist()
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / T
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    chosen = [sorted(range(E), key=lambda e: -row[e])[:K] for row in probs]
    f = [sum(e in c for c in chosen) / (T * K) for e in range(E)]
    P = [sum(row[e] for row in probs) / T for e in range(E)]
    balance = E * sum(fe * pe for fe, pe in zip(f, P, strict=True))
    assert layer.aux_losses["router_z"].item() == pytest.approx(0.3 * z, rel=1e-12)
    assert layer.aux_losses["balance"].item() == pytest.approx(0.7 * balance, rel=1e-12)
    # 1 at perfect balance: uniform probabilities and equal counts
    uniform = torch.full((E * 2, E), 1.0 / E, dtype=torch.float64)
    assert balance_loss(uniform, torch.full((E,), 4)).item() == pytest.approx(1.0)
    assert router_z_loss(torch.zeros(3, E)).item() == pytest.approx(math.log(E) ** 2)


@st.composite
def layer_setup(draw):
    n_experts = draw(st.integers(1, 6))
    shared = draw(st.integers(0, 2))
    return (
        dict(
            d_model=draw(st.integers(1, 7)),
            n_experts=n_experts,
            expert_size=draw(st.integers(1, 5)),
            k=draw(st.integers(1, n_experts)),
            activation=draw(st.sampled_from(["swiglu", "relu", "gelu"])),
            n_shared_experts=shared,
            shared_expert_gate=shared > 0 and draw(st.booleans()),
            score=draw(st.sampled_from(["softmax", "sigmoid"])),
            bias_update_rate=draw(st.sampled_from([None, 0.01])),
            z_loss_weight=0.1,
            balance_loss_weight=0.1,
        ),
        draw(st.integers(1, 12)),
        draw(st.sampled_from([torch.float32, torch.float64])),
        draw(st.integers(0, 2**16)),
    )


@given(setup=layer_setup(), training=st.booleans(), data=st.data())
def test_fast_matches_reference(setup, training, data, leading_shape, fast_vs_reference):
    cfg, n_tokens, dtype, seed = setup
    shape = data.draw(leading_shape(n_tokens))
    x = torch.randn(*shape, cfg["d_model"], generator=torch.Generator().manual_seed(seed))
    fast_vs_reference(lambda impl: TokenChoiceMoE(**cfg, impl=impl), x.to(dtype), seed, training)


def test_expert_bias_logged_with_the_routing_statistics():
    layer = TokenChoiceMoE(4, 3, 2, k=1, bias_update_rate=0.5)
    layer.train()(torch.randn(5, 4))
    layer.after_optimizer_step()
    layer(torch.randn(5, 4))
    stats = layer.routing_stats
    assert torch.equal(stats.expert_bias, layer.router.expert_bias)
    assert stats.expert_bias.data_ptr() != layer.router.expert_bias.data_ptr()
    plain = TokenChoiceMoE(4, 3, 2, 2)
    plain(torch.randn(2, 4))
    assert plain.routing_stats.expert_bias is None


def test_two_gloo_ranks_see_the_global_batch(monkeypatch):
    """With 2 micro-batches on 2 gloo ranks, rank 0's buffers broadcast before each (as DDP
    does), the load the bias update sees is the sum of every micro-batch of every rank, the same
    on both ranks, and so are the updated biases (checks in tests/tc_worker.py)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import tc_worker

    mp.spawn(tc_worker.run_checks, args=(2, tc_worker.free_port()), nprocs=2, join=True)
