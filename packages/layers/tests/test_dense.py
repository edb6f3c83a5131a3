import math

import pytest
import torch
from moe_layers import DenseFFN, collect_aux_losses


def test_shape_and_no_aux_losses():
    layer = DenseFFN(6, 10).train()
    y = layer(torch.randn(2, 3, 6))
    assert y.shape == (2, 3, 6)
    assert collect_aux_losses(layer) == {} and layer.routing_stats is None


def test_is_the_two_layer_mlp():
    torch.manual_seed(0)
    layer = DenseFFN(4, 7).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    expected = torch.relu(x @ layer.fc1.weight.t() + layer.fc1.bias) @ layer.fc2.weight.t()
    torch.testing.assert_close(layer(x), expected + layer.fc2.bias)


@pytest.mark.parametrize("bias", [True, False])
def test_swiglu_is_the_gated_mlp(bias):
    torch.manual_seed(0)
    layer = DenseFFN(4, 7, activation="swiglu", bias=bias).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    fc1, fc2, fc3 = layer.fc1, layer.fc2, layer.fc3
    b = (lambda fc: fc.bias) if bias else (lambda fc: 0)
    u = torch.nn.functional.silu(x @ fc1.weight.t() + b(fc1)) * (x @ fc3.weight.t() + b(fc3))
    torch.testing.assert_close(layer(x), u @ fc2.weight.t() + b(fc2))
    assert layer.config.parameter_count().total == sum(p.numel() for p in layer.parameters())
    assert DenseFFN(4, 7).fc3 is None


@pytest.mark.parametrize("n_layers", [1, 6])
def test_init_std(n_layers):
    torch.manual_seed(1)
    layer = DenseFFN(128, 512, n_layers=n_layers)
    c = math.sqrt(2.0 / n_layers)
    assert layer.fc1.weight.std().item() == pytest.approx(c / math.sqrt(128), rel=0.04)
    assert layer.fc2.weight.std().item() == pytest.approx(c / math.sqrt(512), rel=0.04)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(d_ff=0), "d_ff"),
        (dict(activation="tanh"), "activation"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_configuration(kwargs, option):
    with pytest.raises(ValueError, match=option):
        DenseFFN(**(dict(d_model=8, d_ff=16) | kwargs))
