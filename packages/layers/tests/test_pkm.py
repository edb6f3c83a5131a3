import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_layers import PKM


@given(
    half=st.integers(1, 5),
    n_keys=st.integers(1, 7),
    n_heads=st.integers(1, 3),
    knn_frac=st.floats(0.0, 1.0),
    n_tokens=st.one_of(st.just(1), st.integers(1, 16)),
    activation=st.sampled_from(["softmax", "relu"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_fast_matches_reference(
    half,
    n_keys,
    n_heads,
    knn_frac,
    n_tokens,
    activation,
    dtype,
    seed,
    data,
    leading_shape,
    fast_vs_reference,
):
    knn = max(1, round(knn_frac * n_keys**2))
    shape = data.draw(leading_shape(n_tokens))
    x = torch.randn(*shape, 2 * half, generator=torch.Generator().manual_seed(seed), dtype=dtype)

    def make(impl):
        return PKM(2 * half, n_keys, n_heads, knn, activation=activation, impl=impl)

    fast_vs_reference(make, x, seed, training=False)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_all_values_softmax_is_attention_over_the_product_keys(impl):
    # knn = n_keys², one head: every value is read with softmax weight over all s1[i] + s2[j]
    torch.manual_seed(0)
    layer = PKM(6, 3, 1, 9, activation="softmax", impl=impl).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    k1, k2 = layer.keys[0, 0], layer.keys[0, 1]
    for t in range(4):
        s = torch.tensor(
            [(x[t, :3] @ k1[i] + x[t, 3:] @ k2[j]).item() for i in range(3) for j in range(3)],
            dtype=torch.float64,
        )
        torch.testing.assert_close(layer(x[t : t + 1])[0], torch.softmax(s, 0) @ layer.values)


def test_relu_variant_weights_selected_values_by_relu_score():
    torch.manual_seed(1)
    layer = PKM(4, 4, 2, 3, activation="relu").double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = layer(x)
    for t in range(5):
        expected = torch.zeros(4, dtype=torch.float64)
        for h in range(2):
            s1 = layer.keys[h, 0] @ x[t, :2]
            s2 = layer.keys[h, 1] @ x[t, 2:]
            scores, idx = (s1[:, None] + s2[None, :]).flatten().topk(3)
            expected = expected + torch.relu(scores) @ layer.values[idx]
        torch.testing.assert_close(y[t], expected)


@pytest.mark.parametrize("value_init", ["default", "dense"])
def test_initialisation(value_init):
    torch.manual_seed(2)
    d_model, n_keys, n_layers = 64, 40, 2
    layer = PKM(d_model, n_keys, 4, 8, n_layers=n_layers, value_init=value_init)
    c = math.sqrt(2.0 / n_layers)
    key_std = c / math.sqrt(d_model)
    value_std = c / math.sqrt(d_model if value_init == "default" else n_keys**2)
    # >= 20k samples per matrix: the sample std is within 0.5% (1 sigma); 4% cannot pass by accident
    assert layer.keys.std().item() == pytest.approx(key_std, rel=0.04)
    assert layer.values.std().item() == pytest.approx(value_std, rel=0.04)


def test_routing_stats_count_value_reads():
    layer = PKM(8, 5, 3, 4)
    layer(torch.randn(2, 3, 8))
    assert layer.routing_stats.expert_counts.shape == (25,)
    assert layer.routing_stats.expert_counts.sum().item() == 6 * 3 * 4


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(d_model=7), "d_model"),
        (dict(n_keys=0), "n_keys"),
        (dict(n_heads=0), "n_heads"),
        (dict(knn=17), "knn"),
        (dict(activation="sigmoid"), "activation"),
        (dict(value_init="xavier"), "value_init"),
        (dict(impl="fused"), "impl"),
    ],
)
def test_bad_configuration(kwargs, option):
    with pytest.raises(ValueError, match=option):
        PKM(**(dict(d_model=8, n_keys=4, n_heads=2, knn=4) | kwargs))
