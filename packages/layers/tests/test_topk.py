import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_layers import DenseFFN, TopKFFN
from torch.nn import functional as F


@given(
    d_model=st.integers(1, 9),
    d_ff=st.integers(1, 24),
    k_frac=st.floats(0.0, 1.0),
    n_tokens=st.one_of(st.just(1), st.integers(1, 20)),
    activation=st.sampled_from(["relu", "gelu"]),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_fast_matches_reference(
    d_model,
    d_ff,
    k_frac,
    n_tokens,
    activation,
    bias,
    dtype,
    seed,
    data,
    leading_shape,
    fast_vs_reference,
):
    k = max(1, round(k_frac * d_ff))
    shape = data.draw(leading_shape(n_tokens))
    x = torch.randn(*shape, d_model, generator=torch.Generator().manual_seed(seed), dtype=dtype)

    def make(impl):
        return TopKFFN(d_model, d_ff, k, activation=activation, bias=bias, impl=impl)

    fast_vs_reference(make, x, seed, training=False)


def _as_dense(layer):
    dense = DenseFFN(layer.config.d_model, layer.config.d_ff).double()
    with torch.no_grad():
        dense.fc1.weight.copy_(layer.w1)
        dense.fc1.bias.copy_(layer.b1)
        dense.fc2.weight.copy_(layer.w2.t())
        dense.fc2.bias.copy_(layer.b2)
    return dense


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_k_equal_d_ff_is_the_dense_mlp(impl):
    torch.manual_seed(0)
    layer = TopKFFN(6, 10, 10, impl=impl).double()
    with torch.no_grad():
        layer.b1.normal_()
        layer.b2.normal_()
    x = torch.randn(8, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _as_dense(layer)(x))


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_keeps_exactly_the_k_largest(impl):
    torch.manual_seed(1)
    layer = TopKFFN(5, 12, 3, impl=impl).double()
    x = torch.randn(9, 5, dtype=torch.float64)
    h = F.relu(x @ layer.w1.t() + layer.b1)
    for t in range(9):
        top = sorted(range(12), key=lambda i: -h[t, i].item())[:3]
        expected = sum(h[t, i] * layer.w2[i] for i in top) + layer.b2
        torch.testing.assert_close(layer(x[t : t + 1])[0], expected)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(k=17), "k"),
        (dict(k=0), "k"),
        (dict(d_ff=0), "d_ff"),
        (dict(d_model=-2), "d_model"),
        (dict(activation="softmax"), "activation"),
        (dict(impl="triton"), "impl"),
        (dict(dropout=1.5), "dropout"),
        (dict(n_layers=0), "n_layers"),
    ],
)
def test_bad_configuration(kwargs, option):
    with pytest.raises(ValueError, match=option):
        TopKFFN(**(dict(d_model=8, d_ff=16, k=4) | kwargs))
