import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_layers import HashLayer, collect_aux_losses, collect_routing_stats
from torch import nn
from torch.nn import functional as F


class WithIds(nn.Module):
    """Calls the wrapped layer with fixed token ids, so that the shared helpers can call it as f(x)."""

    def __init__(self, layer: HashLayer, token_ids: torch.Tensor) -> None:
        super().__init__()
        self.layer, self.token_ids = layer, token_ids

    def forward(self, x):
        return self.layer(x, token_ids=self.token_ids)


@given(
    d_model=st.integers(1, 8),
    n_experts=st.integers(1, 6),
    expert_size=st.integers(1, 6),
    vocab_size=st.integers(1, 30),
    n_tokens=st.one_of(st.just(1), st.integers(1, 18)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    hash_kind=st.sampled_from(["random", "balanced"]),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_fast_matches_reference(
    d_model,
    n_experts,
    expert_size,
    vocab_size,
    n_tokens,
    dtype,
    hash_kind,
    training,
    seed,
    data,
    leading_shape,
    fast_vs_reference,
):
    shape = data.draw(leading_shape(n_tokens))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d_model, generator=gen).to(dtype)
    ids = torch.randint(vocab_size, shape, generator=gen)

    def make(impl):
        layer = HashLayer(
            d_model, n_experts, expert_size, vocab_size=vocab_size, hash=hash_kind, impl=impl
        )
        return WithIds(layer, ids)

    fast_vs_reference(make, x, seed, training)


def test_output_is_the_hashed_experts_ffn():
    torch.manual_seed(0)
    layer = HashLayer(5, 4, 3, vocab_size=9, seed=7).double()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    ids = torch.randint(9, (2, 6))
    y = layer(x, token_ids=ids)
    for b in range(2):
        for t in range(6):
            e = layer.router.table[ids[b, t]]
            expected = F.relu(x[b, t] @ layer.experts.w1[e]) @ layer.experts.w2[e]
            torch.testing.assert_close(y[b, t], expected)
    counts = torch.bincount(layer.router.table[ids.flatten()], minlength=4)
    assert torch.equal(collect_routing_stats(layer)[""].expert_counts, counts)
    layer.train()(x, token_ids=ids)
    assert collect_aux_losses(layer) == {}


def test_hash_is_fixed_by_seed_and_saved():
    a = HashLayer(4, 8, 2, vocab_size=100, seed=1)
    b = HashLayer(4, 8, 2, vocab_size=100, seed=1)
    c = HashLayer(4, 8, 2, vocab_size=100, seed=2)
    assert torch.equal(a.router.table, b.router.table)
    assert not torch.equal(a.router.table, c.router.table)
    assert "router.table" in a.state_dict()
    assert a.router.table.min() >= 0 and a.router.table.max() < 8


def test_balanced_hash_gives_each_expert_equal_vocabulary_share():
    layer = HashLayer(4, 7, 2, vocab_size=100, hash="balanced")
    counts = torch.bincount(layer.router.table, minlength=7)
    assert counts.max() - counts.min() <= 1


def test_missing_token_ids_is_a_clear_error():
    layer = HashLayer(4, 3, 2, vocab_size=10)
    with pytest.raises(ValueError, match="token_ids"):
        layer(torch.randn(2, 4))


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.tensor([0, 10]), r"\[0, vocab_size=10\)"),
        (torch.tensor([-1, 2]), r"\[0, vocab_size=10\)"),
        (torch.tensor([1, 2, 3]), "shape"),
        (torch.tensor([1.0, 2.0]), "integer"),
    ],
)
def test_bad_token_ids(ids, match):
    layer = HashLayer(4, 3, 2, vocab_size=10)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(2, 4), token_ids=ids)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(vocab_size=5, hash="md5"), "hash"),
        (dict(vocab_size=5, impl="x"), "impl"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HashLayer(4, 3, 2, **kwargs)
