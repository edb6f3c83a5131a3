import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_layers import SBaseMoE, collect_aux_losses
from moe_layers.sbase import sinkhorn_log, sinkmoid2_scores


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


def _reference_sinkmoid2(logits, n_iters):
    """The authors' sinkmoid2 update written out per sequence and entry with numpy in float64:
    logits [N, L, E] -> scores [N, L, E]."""
    n_seq, length, n_experts = logits.shape
    out = np.empty_like(logits, dtype=np.float64)
    for s in range(n_seq):
        x = logits[s].astype(np.float64)
        a, b = np.zeros(n_experts), np.zeros(length)
        for _ in range(n_iters):
            for t in range(length):
                row = x[t] - a
                b[t] = math.log(length) - (row.max() + math.log(np.exp(row - row.max()).sum()))
            for e in range(n_experts):
                col = x[:, e] - b
                a[e] = math.log(n_experts) - (col.max() + math.log(np.exp(col - col.max()).sum()))
        out[s] = np.exp(x + a[None, :] + b[:, None])
    return out


def _assert_top_k_of(idx_TK, scores_TE, k):
    """Each token's chosen experts are distinct and hold its k largest scores (ties allowed)."""
    for t in range(scores_TE.shape[0]):
        chosen = sorted(idx_TK[t].tolist())
        assert len(set(chosen)) == k
        rest = [e for e in range(scores_TE.shape[1]) if e not in chosen]
        if rest:
            lowest_chosen = min(scores_TE[t, e] for e in chosen)
            assert lowest_chosen >= max(scores_TE[t, e] for e in rest) * (1 - 1e-9), t


@given(
    n_seq=st.integers(1, 3),
    length=st.integers(1, 7),
    n_experts=st.integers(1, 6),
    n_iters=st.integers(0, 5),
    scale=st.floats(0.1, 2.0),
    seed=st.integers(0, 2**16),
)
def test_sinkmoid2_scores_match_the_written_out_update(
    n_seq, length, n_experts, n_iters, scale, seed
):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n_seq, length, n_experts)) * scale
    got = sinkmoid2_scores(torch.tensor(logits), n_iters)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), _reference_sinkmoid2(logits, n_iters), rtol=1e-9)


@given(
    n_seq=st.integers(1, 3),
    length=st.integers(1, 7),
    d_model=st.integers(1, 6),
    n_experts=st.integers(1, 6),
    k_frac=st.floats(0.0, 1.0),
    n_iters=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_sinkmoid2_layer_selects_the_reference_top_k_per_sequence(
    n_seq, length, d_model, n_experts, k_frac, n_iters, seed
):
    k = max(1, round(k_frac * n_experts))
    torch.manual_seed(seed)
    layer = SBaseMoE(
        d_model, n_experts, 3, k, balancing="sinkmoid2", sinkhorn_iters=n_iters, impl="reference"
    ).double()
    x = torch.randn(n_seq, length, d_model, dtype=torch.float64)
    logits = (x @ layer.router.gate.t()).detach()
    ref = _reference_sinkmoid2(logits.numpy(), n_iters).reshape(-1, n_experts)
    routing = layer.router(x.reshape(-1, d_model), seq_len=length)
    _assert_top_k_of(routing.idx_TK, ref, k)
    flat = logits.reshape(-1, n_experts)
    torch.testing.assert_close(routing.gates_TK, torch.sigmoid(flat.gather(1, routing.idx_TK)))
    # the layer routes its [N, L, D] input the same way, and counts what it chose
    layer(x)
    expected_counts = torch.bincount(routing.idx_TK.flatten(), minlength=n_experts)
    assert layer.routing_stats.expert_counts.tolist() == expected_counts.tolist()


@given(
    length=st.integers(2, 8),
    n_experts=st.integers(2, 5),
    seed=st.integers(0, 2**16),
)
def test_sinkmoid2_selection_of_a_sequence_ignores_the_other_sequences(length, n_experts, seed):
    """(Length >= 2: a one-token sequence ties every expert, see the next test.)"""
    torch.manual_seed(seed)
    layer = SBaseMoE(4, n_experts, 3, 1, balancing="sinkmoid2", impl="reference").double()
    x = torch.randn(3, length, 4, dtype=torch.float64)
    y = layer(x)
    idx = layer.router(x.reshape(-1, 4), seq_len=length).idx_TK[:length]
    other = x.clone()
    other[1:] = 5 * torch.randn(2, length, 4, dtype=torch.float64)
    y_other = layer(other)
    assert torch.equal(layer.router(other.reshape(-1, 4), seq_len=length).idx_TK[:length], idx)
    torch.testing.assert_close(y_other[0], y[0])
    # and alone it is routed as in the batch
    torch.testing.assert_close(layer(x[:1])[0], y[0])


def test_sinkmoid2_ties_every_expert_of_a_one_token_sequence():
    """a_e = log E - (x_e - b): every x_e + a_e + b is log E + 2b, whatever the logits; after
    one iteration b = -logsumexp(x)."""
    logits = torch.tensor([[[3.0, -1.0, 0.5]]], dtype=torch.float64)
    scores = sinkmoid2_scores(logits, 1)
    expected = 3 * torch.exp(-2 * torch.logsumexp(logits, dim=-1, keepdim=True))
    torch.testing.assert_close(scores, expected.expand_as(scores))


def test_batch_sinkhorn_depends_on_the_other_sequences_and_sinkmoid2_does_not():
    """Sequence 0 prefers expert 0 a little; in the other sequences every token prefers it
    strongly. Balancing over the batch moves sequence 0's tokens to expert 1; within each
    sequence it does not."""
    mild = torch.zeros(4, 2)
    mild[:, 0] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    strong = torch.zeros(4, 2)
    strong[:, 0] = 5.0
    x = torch.stack([mild, strong, strong])
    for balancing, expected in (("sinkhorn", [1, 1, 1, 1]), ("sinkmoid2", [1, 1, 0, 0])):
        layer = SBaseMoE(2, 2, 3, 1, balancing=balancing)
        with torch.no_grad():
            layer.router.gate.copy_(torch.eye(2))
        idx = layer.router(x.reshape(-1, 2), seq_len=4).idx_TK[:4, 0]
        alone = layer.router(mild, seq_len=4).idx_TK[:, 0]
        assert idx.tolist() == expected, balancing
        assert torch.equal(idx, alone) == (balancing == "sinkmoid2")


@pytest.mark.parametrize("balancing", ["sinkhorn", "sinkmoid2"])
def test_eval_routes_on_the_raw_logits(balancing):
    layer = SBaseMoE(2, 2, 3, 1, sinkhorn_iters=3, balancing=balancing)
    x = _skewed(layer, 10)[None]
    layer.eval()(x)
    assert layer.routing_stats.expert_counts.tolist() == [10, 0]
    layer.train()(x)
    assert layer.routing_stats.expert_counts.tolist() != [10, 0]


def test_bad_balancing():
    with pytest.raises(ValueError, match="balancing 'sinkmoid'"):
        SBaseMoE(8, 4, 3, 2, balancing="sinkmoid")
