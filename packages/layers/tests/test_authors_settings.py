"""The authors' settings as options, each tested against the behaviour its authors' code has: PKM's
dense path (σ-MoE code), Switch's capacity rounding (fairseq) and init (σ-MoE authors' Switch),
BASE's zero-initialised output and per-expert LayerNorm (fairseq), and the entropy regulariser in
float64."""

import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_layers import PKM, BaseLayer, SBaseMoE, SigmaMoE, SwitchMoE, collect_aux_losses
from moe_layers.sigma_moe import negative_batch_entropy

# PKM: the dense path


@given(
    half=st.integers(1, 5),
    n_keys=st.integers(1, 7),
    n_heads=st.integers(1, 4),
    n_tokens=st.one_of(st.just(1), st.integers(1, 16)),
    activation=st.sampled_from(["softmax", "relu"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_pkm_dense_fast_matches_reference(
    half, n_keys, n_heads, n_tokens, activation, dtype, seed, data, leading_shape, fast_vs_reference
):
    shape = data.draw(leading_shape(n_tokens))
    x = torch.randn(*shape, 2 * half, generator=torch.Generator().manual_seed(seed), dtype=dtype)

    def make(impl):
        return PKM(
            2 * half, n_keys, n_heads, 1, selection="dense", activation=activation, impl=impl
        )

    fast_vs_reference(make, x, seed, training=True)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_pkm_dense_path_is_the_formula(impl, activation):
    """score(i, j) = sum_h (q1 . k1[h, i] + q2 . k2[h, j]); y = sum_ij act(score)(i, j) v[i N + j],
    the activation over all N² scores of the token."""
    torch.manual_seed(0)
    n_keys, n_heads, d = 3, 3, 8
    # knn plays no part on the dense path
    layer = PKM(d, n_keys, n_heads, 2, selection="dense", activation=activation, impl=impl)
    layer = layer.double()
    x = torch.randn(4, d, dtype=torch.float64)
    k, v = layer.keys.detach(), layer.values.detach()
    y = layer(x)
    for t in range(4):
        scores = []
        for i in range(n_keys):
            for j in range(n_keys):
                s = 0.0
                for h in range(n_heads):
                    s += float(x[t, : d // 2] @ k[h, 0, i]) + float(x[t, d // 2 :] @ k[h, 1, j])
                scores.append(s)
        scores = torch.tensor(scores, dtype=torch.float64)
        w = torch.relu(scores) if activation == "relu" else torch.softmax(scores, 0)
        expected = sum(w[i] * v[i] for i in range(n_keys**2))
        torch.testing.assert_close(y[t], expected)


@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_pkm_one_head_reading_every_value_is_the_dense_path(activation):
    """With one head and knn = n_keys², top-k reads every value with the same scores: both paths
    give the same output. With several heads they differ (act of the sum vs sum of acts)."""
    torch.manual_seed(1)
    x = torch.randn(6, 6, dtype=torch.float64)
    for n_heads, same in [(1, True), (3, False)]:
        topk = PKM(6, 3, n_heads, 9, activation=activation).double()
        dense = PKM(6, 3, n_heads, 9, selection="dense", activation=activation).double()
        dense.load_state_dict(topk.state_dict())
        assert torch.allclose(topk(x), dense(x)) == same


def test_pkm_auto_decides_as_the_authors_code():
    """The authors' code takes its dense path when n_keys <= knn."""
    for n_keys in (46, 62, 64, 89):
        assert PKM.Config(d_model=8, n_keys=n_keys, knn=128, selection="auto").dense_path
    assert PKM.Config(d_model=8, n_keys=128, knn=128, selection="auto").dense_path
    assert not PKM.Config(d_model=8, n_keys=129, knn=128, selection="auto").dense_path
    assert not PKM.Config(d_model=8, n_keys=62, knn=128).dense_path, "topk is the default"
    assert PKM.Config(d_model=8, n_keys=62, knn=1, selection="dense").dense_path
    torch.manual_seed(2)
    x = torch.randn(5, 8)
    for knn, equivalent in [(4, "dense"), (3, "topk")]:
        auto = PKM(8, 4, 2, knn, selection="auto")
        other = PKM(8, 4, 2, knn, selection=equivalent)
        other.load_state_dict(auto.state_dict())
        torch.testing.assert_close(auto(x), other(x), rtol=0, atol=0)


def test_pkm_dense_relu_activates_about_half_the_values():
    torch.manual_seed(3)
    layer = PKM(64, 32, 4, 128, selection="auto", activation="relu", n_layers=16)
    layer(torch.randn(200, 64))
    stats = layer.routing_stats
    assert stats.expert_counts.shape == (32**2,)
    active = stats.expert_counts.sum().item() / (200 * 32**2)
    # symmetric scores at init: P(score > 0) = 1/2; 204800 draws (correlated within a token)
    assert 0.4 < active < 0.6


def test_pkm_dense_counts_every_value_as_active():
    dense = PKM.Config(d_model=412, n_keys=62, n_heads=4, knn=128, selection="auto")
    topk = PKM.Config(d_model=412, n_keys=62, n_heads=4, knn=128)
    assert dense.parameter_count().total == topk.parameter_count().total
    assert dense.parameter_count().active == dense.parameter_count().total
    keys = 4 * 2 * 62 * 206
    assert topk.parameter_count().active == keys + 4 * 128 * 412


# Switch: capacity rounding and the authors' init


@pytest.mark.parametrize("rounding, slots", [("switch", 25), ("fairseq", 26)])
def test_switch_capacity_rounding_at_100_tokens_8_experts(rounding, slots):
    """S = 100, E = 8, f = 2: ceil(2 * 100 / 8) = 25 (Switch) vs int(2 * ceil(100 / 8)) = 26."""
    layer = SwitchMoE(8, 8, 2, capacity_factor=2.0, capacity_rounding=rounding).train()
    assert layer.router.capacity(100) == slots
    with torch.no_grad():
        layer.router.gate.copy_(torch.eye(8))
    x = torch.zeros(100, 8)
    x[:, 0] = 1.0  # every token prefers expert 0
    layer(x)
    assert layer.routing_stats.dropped == 100 - slots
    # at E = 4 both give 50
    at_4 = SwitchMoE(4, 4, 2, capacity_factor=2.0, capacity_rounding=rounding).train()
    assert at_4.router.capacity(100) == 50


def test_switch_capacity_rounding_formulas():
    for rounding in ("switch", "fairseq"):
        for f in (0.5, 1.0, 1.25, 2.0):
            for n_experts in range(1, 10):
                layer = SwitchMoE(4, n_experts, 2, capacity_factor=f, capacity_rounding=rounding)
                for n_tokens in range(0, 60):
                    exact = Fraction(f)
                    if rounding == "switch":
                        expected = math.ceil(exact * n_tokens / n_experts)
                    else:
                        expected = math.floor(exact * math.ceil(Fraction(n_tokens, n_experts)))
                    assert layer.train().router.capacity(n_tokens) == expected
    # fairseq may give fewer slots too: int(0.5 * ceil(10 / 4)) = 1 < ceil(0.5 * 10 / 4) = 2
    fewer = SwitchMoE(4, 4, 2, capacity_factor=0.5, capacity_rounding="fairseq").train()
    assert fewer.router.capacity(10) == 1


@pytest.mark.parametrize("rounding", ["switch", "fairseq"])
def test_switch_eval_capacity_ignores_the_rounding(rounding):
    """In eval, None sets no limit; a fraction f gives ceil(f * S), fairseq's eval formula."""
    layer = SwitchMoE(4, 8, 2, capacity_factor=2.0, capacity_rounding=rounding).eval()
    assert layer.router.capacity(100) is None
    capped = SwitchMoE(4, 8, 2, eval_capacity_factor=0.25, capacity_rounding=rounding).eval()
    assert capped.router.capacity(101) == 26


def test_switch_authors_init_at_the_measured_size():
    """The σ-MoE authors' Switch (expert_size_init=1, init_scale=0.1, no gate row norm), measured
    at d=1024, E=8, G=512, L=18: W1 std 0.00329, W2 0.00466, gate 0.00333, row norms 0.103-0.109."""
    torch.manual_seed(0)
    layer = SwitchMoE(
        1024, 8, 512, n_layers=18, init="expert_size", init_scale=0.1, normalize_gate_rows=False
    )
    # 4M samples in w1 and w2 (std within 0.1%), 8k in the gate (within 1%)
    assert layer.experts.w1.std().item() == pytest.approx(0.00329, rel=0.02)
    assert layer.experts.w2.std().item() == pytest.approx(0.00466, rel=0.02)
    assert layer.router.gate.std().item() == pytest.approx(0.00333, rel=0.03)
    norms = layer.router.gate.norm(dim=-1)
    assert 0.095 < norms.min() < norms.max() < 0.117
    assert norms.max() - norms.min() > 1e-3, "rows are left as drawn"
    # today's default is sqrt(10) = 3.16x larger
    ours = SwitchMoE(1024, 8, 512, n_layers=18, init="expert_size")
    ratio = ours.experts.w1.std() / layer.experts.w1.std()
    assert ratio.item() == pytest.approx(math.sqrt(10), rel=0.01)
    normed = ours.router.gate.norm(dim=-1)
    torch.testing.assert_close(normed, torch.full_like(normed, normed[0].item()))


def test_switch_init_scale_multiplies_the_variance():
    kw = dict(n_layers=4, normalize_gate_rows=False)
    torch.manual_seed(5)
    one = SwitchMoE(16, 4, 8, **kw)
    torch.manual_seed(5)
    scaled = SwitchMoE(16, 4, 8, init_scale=0.25, **kw)
    for name, p in one.named_parameters():
        torch.testing.assert_close(dict(scaled.named_parameters())[name], 0.5 * p, msg=name)


# BASE: fairseq's zero-initialised output and per-expert LayerNorm


def test_base_zero_init_output_starts_at_zero():
    torch.manual_seed(0)
    default = BaseLayer(6, 3, 5)
    torch.manual_seed(0)
    zero = BaseLayer(6, 3, 5, zero_init_output=True)
    assert default.experts.w2.abs().min() > 0
    assert (zero.experts.w2 == 0).all()
    torch.testing.assert_close(zero.experts.w1, default.experts.w1)
    torch.testing.assert_close(zero.router.gate, default.router.gate)
    x = torch.randn(2, 9, 6)
    y = zero.train()(x)
    assert (y == 0).all()
    (y * torch.randn_like(y)).sum().backward()
    assert zero.experts.w2.grad.abs().sum() > 0
    assert (zero.experts.w1.grad == 0).all()


def _layer_norm(x, weight, bias):
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_base_expert_norm_is_each_experts_own_layer_norm(impl):
    torch.manual_seed(1)
    layer = BaseLayer(5, 3, 4, expert_norm=True, impl=impl).double().eval()
    with torch.no_grad():
        layer.expert_norm.weight.normal_()
        layer.expert_norm.bias.normal_()
    x = torch.randn(8, 5, dtype=torch.float64) * 3 + 1
    y = layer(x)
    c, w1, w2 = layer.router.gate, layer.experts.w1, layer.experts.w2
    for t in range(8):
        e = int((x[t] @ c.t()).argmax())
        h = _layer_norm(x[t], layer.expert_norm.weight[e], layer.expert_norm.bias[e])
        expected = torch.sigmoid(x[t] @ c[e]) * (torch.relu(h @ w1[e]) @ w2[e])
        torch.testing.assert_close(y[t], expected)


def test_base_expert_norm_changes_only_its_experts_tokens_and_not_the_routing():
    torch.manual_seed(2)
    layer = BaseLayer(4, 2, 6, expert_norm=True).eval()
    plain = BaseLayer(4, 2, 6)
    plain.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(20, 4)
    e = (x @ layer.router.gate.t()).argmax(-1)
    assert 0 < e.sum() < 20
    before = layer(x)
    plain.eval()(x)
    assert torch.equal(layer.routing_stats.expert_counts, plain.routing_stats.expert_counts)
    with torch.no_grad():
        layer.expert_norm.bias[1] += 1.0
    after = layer(x)
    torch.testing.assert_close(after[e == 0], before[e == 0], rtol=0, atol=0)
    assert not torch.allclose(after[e == 1], before[e == 1])


@given(
    d_model=st.integers(1, 8),
    n_experts=st.integers(1, 5),
    expert_size=st.integers(1, 6),
    n_tokens=st.one_of(st.just(1), st.integers(1, 18)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_base_expert_norm_fast_matches_reference(
    d_model,
    n_experts,
    expert_size,
    n_tokens,
    dtype,
    training,
    seed,
    data,
    leading_shape,
    fast_vs_reference,
):
    shape = data.draw(leading_shape(n_tokens))
    x = torch.randn(*shape, d_model, generator=torch.Generator().manual_seed(seed)).to(dtype)

    def make(impl):
        layer = BaseLayer(d_model, n_experts, expert_size, expert_norm=True, impl=impl)
        with torch.no_grad():
            layer.expert_norm.weight.uniform_(0.5, 1.5)
            layer.expert_norm.bias.uniform_(-0.5, 0.5)
        return layer

    fast_vs_reference(make, x, seed, training)


def test_base_expert_norm_parameter_count():
    cfg = BaseLayer.Config(d_model=6, n_experts=3, expert_size=4, expert_norm=True)
    plain = BaseLayer.Config(d_model=6, n_experts=3, expert_size=4)
    assert cfg.parameter_count().total == plain.parameter_count().total + 3 * 2 * 6
    assert cfg.parameter_count().active == plain.parameter_count().active + 2 * 6


# the entropy regulariser in the input's precision


def _scipy_negative_entropy(logits: torch.Tensor) -> float:
    z = logits.detach().numpy().astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return -float(scipy.stats.entropy(p.mean(0)))


@pytest.mark.parametrize("n_tokens, n_experts, spread", [(7, 5, 1.0), (64, 16, 4.0), (1, 3, 0.1)])
def test_negative_batch_entropy_in_float64(n_tokens, n_experts, spread):
    gen = torch.Generator().manual_seed(n_tokens)
    logits = torch.randn(n_tokens, n_experts, generator=gen, dtype=torch.float64) * spread
    value = negative_batch_entropy(logits)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(_scipy_negative_entropy(logits), abs=1e-12)


def test_negative_batch_entropy_promotes_half_precision():
    logits = torch.randn(9, 4, dtype=torch.bfloat16)
    value = negative_batch_entropy(logits)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(_scipy_negative_entropy(logits.double()), abs=1e-6)


@pytest.mark.parametrize("cls", [SigmaMoE, SBaseMoE])
def test_entropy_aux_loss_of_a_float64_layer_is_float64(cls):
    torch.manual_seed(4)
    layer = cls(6, 5, 3, 2, entropy_weight=0.5).double().train()
    x = torch.randn(11, 6, dtype=torch.float64)
    layer(x)
    loss = collect_aux_losses(layer)["entropy"]
    assert loss.dtype == torch.float64
    expected = 0.5 * _scipy_negative_entropy(x @ layer.router.gate.detach().t())
    assert loss.item() == pytest.approx(expected, abs=1e-12)


# the new options under bf16 autocast (as `moe-train --precision bf16` runs them)

AUTOCAST_LAYERS = {
    "pkm-dense-relu": lambda: PKM(32, 8, 2, 8, selection="dense", activation="relu"),
    "pkm-dense-softmax": lambda: PKM(32, 8, 2, 8, selection="dense"),
    "base-fairseq": lambda: BaseLayer(32, 4, 16, expert_norm=True),
    "switch-authors": lambda: SwitchMoE(
        32, 4, 16, init="expert_size", init_scale=0.1, normalize_gate_rows=False
    ),
}


@pytest.mark.parametrize("name", list(AUTOCAST_LAYERS))
def test_options_run_under_bf16_autocast(name):
    torch.manual_seed(0)
    layer = AUTOCAST_LAYERS[name]().eval()
    x = torch.randn(3, 8, 32)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    err = (y.float() - ref).abs().mean() / ref.abs().mean()
    assert err < 0.1, f"{name}: relative error {err:.3g} under bf16 autocast"
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
