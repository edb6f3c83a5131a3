"""SwitchHead against its per-token reference (outputs and gradients), its special cases and its
one-line errors."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_layers import SwitchHead
from moe_layers.switchhead import reference_switchhead
from torch.nn import functional as F

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-10)}


def _grads(out, inputs, seed):
    cotangent = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype
    )
    grads = torch.autograd.grad(out, inputs, cotangent, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs, strict=True)]


@st.composite
def _sizes(draw):
    n_experts = draw(st.integers(1, 4))
    return dict(
        batch=draw(st.integers(1, 2)),
        length=draw(st.integers(0, 4)),
        mem=draw(st.integers(0, 3)),
        n_heads=draw(st.integers(1, 3)),
        d_head=draw(st.sampled_from([1, 4, 5, 8])),
        n_experts=n_experts,
        k=draw(st.integers(1, n_experts)),
        positions=draw(st.sampled_from(["rope", "xl"])),
        peri_norm=draw(st.booleans()),
        impl=draw(st.sampled_from(["fast", "dense"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        seed=draw(st.integers(0, 2**16)),
    )


@given(_sizes())
def test_switchhead_matches_the_per_token_reference(s):
    torch.manual_seed(s["seed"])
    d_model, dtype = 6, s["dtype"]
    layer = SwitchHead(
        d_model,
        n_heads=s["n_heads"],
        n_experts=s["n_experts"],
        k=s["k"],
        d_head=s["d_head"],
        positions=s["positions"],
        peri_norm=s["peri_norm"],
        impl=s["impl"],
        n_layers=2,
    ).to(dtype)
    with torch.no_grad():
        # nonzero position biases and norm affine, so that every term is exercised
        for name, p in layer.named_parameters():
            if "bias" in name or "norm" in name:
                p.normal_()
    x = torch.randn(s["batch"], s["length"], d_model, dtype=dtype, requires_grad=True)
    mem = torch.randn(s["batch"], s["mem"], d_model, dtype=dtype, requires_grad=True)
    memory = mem if s["mem"] else None
    inputs = [x] + ([mem] if memory is not None else []) + list(layer.parameters())
    fast = layer(x, memory)
    ref = reference_switchhead(layer, x, memory)
    assert fast.shape == x.shape and fast.dtype == dtype
    torch.testing.assert_close(fast, ref, **TOL[dtype])
    if fast.numel() == 0:
        return  # no token: nothing for a gradient to flow from
    for a, b in zip(_grads(fast, inputs, 1), _grads(ref, inputs, 1), strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_one_expert_is_attention_with_a_sigmoid_output_gate():
    torch.manual_seed(0)
    layer = SwitchHead(8, n_heads=2, n_experts=1, k=1, d_head=4).double()
    assert layer.sel_v is None
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    q = layer.q(x).view(2, 5, 2, 4)
    k = layer.k(x).view(2, 5, 2, 4)
    v = torch.einsum("bld,hde->blhe", x, layer.w_v)
    # RoPE on 2 of the 4 dims: pairs (0, 1) rotated by angle = position
    pos = torch.arange(5, dtype=torch.float64)[None, :, None]
    cos, sin = pos.cos(), pos.sin()

    def rope(t):
        a, b = t[..., 0], t[..., 1]
        return torch.stack([a * cos - b * sin, b * cos + a * sin, t[..., 2], t[..., 3]], -1)

    att = F.scaled_dot_product_attention(
        rope(q).transpose(1, 2), rope(k).transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    gate = torch.sigmoid(layer.sel_o(x))  # [B, L, H]
    expected = torch.einsum("blh,blhd,hde->ble", gate, att, layer.w_o)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_k_equal_n_experts_uses_every_expert_with_its_sigmoid_gate():
    torch.manual_seed(0)
    layer = SwitchHead(8, n_heads=1, n_experts=3, k=3, d_head=2, positions="xl").double()
    x = torch.randn(1, 1, 8, dtype=torch.float64)
    # one token attends to itself only: its value is the gated sum of all value experts
    v = sum(
        torch.sigmoid(x[0, 0] @ layer.sel_v.weight[e]) * (x[0, 0] @ layer.w_v[e]) for e in range(3)
    )
    y = sum(torch.sigmoid(x[0, 0] @ layer.sel_o.weight[e]) * (v @ layer.w_o[e]) for e in range(3))
    torch.testing.assert_close(layer(x)[0, 0], y, rtol=1e-10, atol=1e-12)


def test_the_entropy_regulariser_is_the_mean_over_heads_of_both_sides():
    torch.manual_seed(0)
    layer = SwitchHead(8, n_heads=2, n_experts=3, k=1, d_head=4, entropy_weight=0.5).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    layer.train()(x)
    expected = 0.0
    for sel in (layer.sel_v, layer.sel_o):
        p = torch.softmax(sel(x.reshape(6, 8)).view(6, 2, 3), -1).mean(0)  # [H, E]
        expected += (p * p.log()).sum(-1).mean()
    torch.testing.assert_close(layer.aux_losses["attention_entropy"], 0.5 * expected)
    layer.eval()(x)
    assert layer.aux_losses == {}
    stats = layer.routing_stats
    assert stats.n_tokens == 6 and int(stats.expert_counts.sum()) == 6 * 2


def test_expert_dropout_changes_only_the_selection_in_training():
    torch.manual_seed(0)
    layer = SwitchHead(8, n_heads=2, n_experts=4, k=2, d_head=4, expert_dropout=0.5)
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(layer.eval()(x), reference_switchhead(layer, x, None))
    torch.manual_seed(1)
    y1 = layer.train()(x)
    torch.manual_seed(1)
    y2 = layer.train()(x)
    torch.testing.assert_close(y1, y2)
    assert not torch.allclose(y1, layer.eval()(x))


def test_parameter_count_is_the_built_layers():
    for positions in ("rope", "xl"):
        for n_experts, k in ((1, 1), (5, 2)):
            cfg = SwitchHead.Config(
                d_model=12, n_heads=3, n_experts=n_experts, k=k, positions=positions, peri_norm=True
            )
            layer = cfg.build()
            counts = cfg.parameter_count()
            assert counts.total == sum(p.numel() for p in layer.parameters())
            expert = 2 * 12 * 4  # one value and one output expert of one head
            assert counts.total - counts.active == 3 * (n_experts - k) * expert


def test_init_scales_with_depth():
    torch.manual_seed(0)
    layer = SwitchHead(256, n_heads=4, n_experts=4, k=2, n_layers=8)
    assert layer.q.weight.std().item() == pytest.approx(math.sqrt(2 / (8 * 256)), rel=0.05)
    assert layer.w_o.std().item() == pytest.approx(math.sqrt(2 / (8 * 256)), rel=0.05)
    norms = layer.sel_v.weight.norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, math.sqrt(2 / 8)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(k=5), r"k must be at most n_experts \(4\), got 5"),
        (dict(positions="alibi"), "unknown positions 'alibi'"),
        (dict(d_head=None, n_heads=3), "not divisible by n_heads=3"),
        (dict(expert_dropout=1.0), r"expert_dropout must be a number in \[0, 1\)"),
        (dict(rope_base=0.5), "rope_base must be a number > 1"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    kwargs = dict(n_heads=2, n_experts=4, k=2, d_head=4) | options
    with pytest.raises(ValueError, match=message) as err:
        SwitchHead(8, **kwargs)
    assert "\n" not in str(err.value)


def test_wrong_widths_are_one_line_errors():
    layer = SwitchHead(8, n_heads=2, n_experts=2, k=1)
    for x, mem in ((torch.randn(2, 3, 7), None), (torch.randn(2, 3, 8), torch.randn(1, 2, 8))):
        with pytest.raises(ValueError, match="d_model=8") as err:
            layer(x, mem)
        assert "\n" not in str(err.value)
