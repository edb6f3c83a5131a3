import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_layers import CausalSGU, SMoE, TMoE, collect_routing_stats
from torch import nn


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Larger random spatial weights than the near-identity init, so that mixing shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return module


@st.composite
def smoe_config(draw):
    n_experts = draw(st.integers(1, 4))
    routing = draw(st.sampled_from(["deterministic", "learned"]))
    seq_len = draw(st.integers(1, 9))
    return dict(
        n_experts=n_experts,
        d_model=n_experts * draw(st.integers(1, 3)),
        seq_len=seq_len,
        length=draw(st.integers(1, seq_len)),
        batch=draw(st.sampled_from([(), (1,), (3,), (2, 2)])),
        routing=routing,
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        training=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@given(cfg=smoe_config())
def test_smoe_fast_matches_reference(cfg, fast_vs_reference):
    def make(impl):
        layer = SMoE(
            cfg["d_model"], cfg["n_experts"], cfg["seq_len"], routing=cfg["routing"], impl=impl
        )
        return randomise(layer, cfg["seed"])

    length = max(cfg["length"], make("fast").prefix_len)
    shape = (*cfg["batch"], length, cfg["d_model"])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(cfg["seed"] + 2))
    fast_vs_reference(make, x.to(cfg["dtype"]), cfg["seed"], cfg["training"])


@pytest.mark.parametrize("routing", ["deterministic", "learned"])
def test_smoe_is_causal_after_the_prefix(routing):
    torch.manual_seed(0)
    layer = randomise(SMoE(6, 3, 10, routing=routing), 1).double()
    x = torch.randn(2, 10, 6, dtype=torch.float64)
    y = layer(x)
    mask = layer.loss_mask(10)
    assert mask.sum() == 10 - layer.prefix_len
    for t in range(10):
        x2 = x.clone()
        x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
        same = torch.allclose(layer(x2)[:, t], y[:, t])
        if mask[t]:
            assert same
    if routing == "learned":
        # inside the prefix the routing sees later positions: those outputs are not causal
        x2 = x.clone()
        x2[:, layer.prefix_len - 1] += 5
        assert not torch.allclose(layer(x2)[:, 0], y[:, 0])


@pytest.mark.parametrize("routing", ["deterministic", "learned"])
def test_shorter_sequences_match_the_positions_of_longer_ones(routing):
    torch.manual_seed(2)
    layer = randomise(SMoE(4, 2, 8, routing=routing), 3).double()
    x = torch.randn(3, 8, 4, dtype=torch.float64)
    full = layer(x)
    for length in range(max(layer.prefix_len, 1), 8):
        torch.testing.assert_close(layer(x[:, :length]), full[:, :length])


def test_deterministic_routing_sends_chunk_i_to_expert_i():
    torch.manual_seed(4)
    layer = randomise(SMoE(6, 3, 5), 5).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    y = layer(x)
    for e in range(3):
        chunk = x[:, 2 * e : 2 * e + 2]
        mixed = torch.tril(layer.weight[e]) @ chunk + layer.bias[e][:, None]
        torch.testing.assert_close(y[:, 2 * e : 2 * e + 2], chunk * mixed)
    assert torch.equal(
        collect_routing_stats(layer)[""].expert_counts, torch.ones(3, dtype=torch.long)
    )


def test_smoe_starts_near_identity():
    torch.manual_seed(6)
    x = torch.randn(2, 7, 8)
    torch.testing.assert_close(SMoE(8, 4, 7)(x), x, rtol=1e-2, atol=1e-2)


def test_causal_sgu():
    torch.manual_seed(7)
    sgu = randomise(CausalSGU(6, 5), 8).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    y = sgu(x)
    assert y.shape == (2, 5, 3)
    u, v = x[..., :3], sgu.norm(x[..., 3:])
    expected = u * (torch.tril(sgu.weight) @ v + sgu.bias[:, None])
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(sgu(x[:, :3]), y[:, :3])


def test_tmoe_routings():
    torch.manual_seed(8)
    layer = TMoE(6, 3, 4).double()
    x = layer.router.gate[0].detach() * 40 + 0.01 * torch.randn(9, 6, dtype=torch.float64)
    layer.train()(x)
    assert torch.equal(collect_routing_stats(layer)[""].expert_counts, torch.full((3,), 3))
    greedy = TMoE(6, 3, 4, routing="top1").double()
    greedy.load_state_dict(layer.state_dict())
    greedy.train()(x)
    expected = torch.bincount((x @ layer.router.gate.t()).argmax(-1), minlength=3)
    assert torch.equal(collect_routing_stats(greedy)[""].expert_counts, expected)


def test_tmoe_fast_matches_reference(fast_vs_reference):
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    fast_vs_reference(lambda impl: TMoE(6, 4, 3, impl=impl), x, 9, True)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SMoE(7, 3, 5), "divisible"),
        (lambda: SMoE(6, 3, 5, routing="hash"), "routing"),
        (lambda: SMoE(6, 3, 5, routing="learned", prefix_fraction=1.0), "prefix_fraction"),
        (lambda: SMoE(6, 3, 0), "seq_len"),
        (lambda: CausalSGU(5, 4), "even"),
        (lambda: TMoE(6, 3, 4, routing="sinkhorn"), "routing"),
    ],
)
def test_bad_configuration(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_sequences():
    with pytest.raises(ValueError, match="seq_len=5"):
        SMoE(6, 3, 5)(torch.randn(6, 6))
    with pytest.raises(ValueError, match="d_model=6"):
        SMoE(6, 3, 5)(torch.randn(4, 4))
    with pytest.raises(ValueError, match="prefix_len"):
        SMoE(6, 3, 10, routing="learned", prefix_fraction=0.5)(torch.randn(3, 6))
    with pytest.raises(ValueError, match="seq_len=4"):
        CausalSGU(6, 4)(torch.randn(5, 6))
