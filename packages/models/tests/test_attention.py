"""The relative attention of the Transformer-XL against its readable reference."""

import moe_models
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_models.transformer_xl import reference_relative_attention


@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 9),
    mem=st.integers(0, 7),
    heads=st.sampled_from([1, 2, 3]),
    d_head=st.sampled_from([1, 4, 5]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_relative_attention_matches_reference(batch, length, mem, heads, d_head, dtype, seed):
    torch.manual_seed(seed)
    cfg = moe_models.get_config("tiny-dense", d_model=12, n_heads=heads, d_head=d_head, n_layers=1)
    attn = moe_models.build(cfg).layers[0].attn.to(dtype)
    # nonzero biases so that both bias terms are exercised
    with torch.no_grad():
        attn.content_bias.normal_()
        attn.position_bias.normal_()
    x = torch.randn(batch, length, 12, dtype=dtype, requires_grad=True)
    m = torch.randn(batch, mem, 12, dtype=dtype, requires_grad=True) if mem else None
    inputs = [x] + ([m] if m is not None else []) + list(attn.parameters())
    fast = attn(x, m)
    ref = reference_relative_attention(attn, x, m)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fast, ref, **tol)
    grad_out = torch.randn_like(fast)
    g_fast = torch.autograd.grad(fast, inputs, grad_out)
    g_ref = torch.autograd.grad(ref, inputs, grad_out)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, **tol)
