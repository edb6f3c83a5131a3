"""Helpers shared by the moe_layers tests, handed out as session fixtures: under
--import-mode=importlib test modules cannot import this file or each other."""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}


@st.composite
def _leading_shape(draw, n_tokens: int) -> tuple[int, ...]:
    """A batch shape with n_tokens elements: [n], [1, n] or [a, b] with a * b = n."""
    divisors = [a for a in range(1, n_tokens + 1) if n_tokens % a == 0]
    form = draw(st.sampled_from(["flat", "one", "split"]))
    if form == "flat":
        return (n_tokens,)
    if form == "one":
        return (1, n_tokens)
    a = draw(st.sampled_from(divisors))
    return (a, n_tokens // a)


def run_with_grads(layer: torch.nn.Module, x: torch.Tensor, seed: int):
    """Output, input gradient and parameter gradients of sum(y * r), r a fixed random cotangent."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = layer(x)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=y.dtype)
    (y * r).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads


def assert_fast_matches_reference(make_layer, x: torch.Tensor, seed: int, training: bool) -> None:
    """The layer with impl="fast" and the same layer with impl="reference" agree in output and all
    gradients. Both forwards start from the same RNG state, so random routing choices (expert
    dropout) coincide."""
    torch.manual_seed(seed)
    fast = make_layer("fast").to(x.dtype).train(training)
    ref = make_layer("reference").to(x.dtype).train(training)
    ref.load_state_dict(fast.state_dict())
    y_f, gx_f, g_f = run_with_grads(fast, x, seed)
    y_r, gx_r, g_r = run_with_grads(ref, x, seed)
    tol = TOLERANCE[x.dtype]
    assert y_f.shape == x.shape and y_f.dtype == x.dtype
    torch.testing.assert_close(y_f, y_r, **tol)
    torch.testing.assert_close(gx_f, gx_r, **tol)
    assert g_f.keys() == g_r.keys()
    for name in g_f:
        if g_f[name] is None and g_r[name] is None:
            continue
        # a parameter no token reached may get no gradient on one path and zeros on the other
        gf = torch.zeros_like(g_r[name]) if g_f[name] is None else g_f[name]
        gr = torch.zeros_like(gf) if g_r[name] is None else g_r[name]
        torch.testing.assert_close(gf, gr, **tol, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.fixture(scope="session")
def leading_shape():
    """Strategy factory: leading_shape(n_tokens) draws a batch shape holding n_tokens tokens."""
    return _leading_shape


@pytest.fixture(scope="session")
def fast_vs_reference():
    """assert_fast_matches_reference(make_layer, x, seed, training)."""
    return assert_fast_matches_reference
