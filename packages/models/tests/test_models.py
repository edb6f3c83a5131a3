"""Output shapes, causality, Transformer-XL memory, the decoder cache and the loss of every model."""

import moe_models
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_layers import collect_routing_stats
from moe_models import IGNORE_INDEX
from moe_models.config import ARCHS
from moe_models.registry import BUILTIN_FFNS
from torch.nn import functional as F

ALL = [(a, f) for a in ARCHS for f in list(BUILTIN_FFNS)]


@pytest.mark.parametrize("arch,ffn", ALL)
@settings(max_examples=4)  # 30 combinations: few examples each keeps the suite fast
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 16),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_shapes_and_causality(small, arch, ffn, batch, length, data, seed):
    """Changing the token at position p never changes the logits before p (in eval mode, where
    every layer routes each token on its own)."""
    model = small(arch, ffn, seed).eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 37, (batch, length), generator=g)
    pos = data.draw(st.integers(0, length - 1), label="changed position")
    changed = tokens.clone()
    changed[:, pos] = (changed[:, pos] + 1 + torch.randint(0, 36, (batch,), generator=g)) % 37
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.logits.shape == (batch, length, 37)
    assert a.loss is None and a.lm_loss is None
    torch.testing.assert_close(a.logits[:, :pos], b.logits[:, :pos], rtol=1e-5, atol=1e-5)
    # the changed token's own logits do depend on it (it is the input at that position)
    assert not torch.allclose(a.logits[:, pos], b.logits[:, pos])


@pytest.mark.parametrize("ffn", ["dense", "sigma_moe", "pkm"])
@given(first=st.integers(1, 10), second=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_xl_memory_matches_one_long_window(small, ffn, first, second, seed):
    """Two segments with memory give the logits of one forward pass over both, when the memory
    holds the whole first segment."""
    model = small("transformer_xl", ffn, seed, mem_len=first).eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 37, (2, first + second), generator=g)
    with torch.no_grad():
        whole = model(tokens).logits
        out1 = model(tokens[:, :first])
        out2 = model(tokens[:, first:], state=out1.state)
    assert [m.shape[1] for m in out2.state] == [min(first, second + first)] * 2
    torch.testing.assert_close(torch.cat([out1.logits, out2.logits], 1), whole)


@given(seg=st.integers(1, 6), mem_len=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_xl_memory_is_a_sliding_window(small, seg, mem_len, seed):
    """Three segments with a memory of mem_len positions: the third segment's logits equal a
    single pass over the same last mem_len positions of context followed by the segment, when
    the model has one layer (so that the memory is exactly the embedded context)."""
    model = small("transformer_xl", "dense", seed, mem_len=mem_len, n_layers=1).eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 37, (2, 3 * seg), generator=g)
    with torch.no_grad():
        state = None
        for s in range(3):
            out = model(tokens[:, s * seg : (s + 1) * seg], state=state)
            state = out.state
        start = max(2 * seg - mem_len, 0)
        direct = model(tokens[:, start:]).logits[:, -seg:]
    torch.testing.assert_close(out.logits, direct)


@pytest.mark.parametrize("ffn", ["dense", "gshard"])
@given(prefix=st.integers(1, 8), steps=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_decoder_cache_matches_full_pass(small, ffn, prefix, steps, seed):
    model = small("decoder", ffn, seed).eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 37, (2, prefix + steps), generator=g)
    with torch.no_grad():
        full = model(tokens).logits
        out = model(tokens[:, :prefix], state=model.init_state())
        pieces = [out.logits]
        for t in range(prefix, prefix + steps):
            out = model(tokens[:, t : t + 1], state=out.state)
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_ignores_masked_targets_and_adds_aux_losses(small, arch):
    model = small(arch, "sigma_moe", 3).train()
    tokens = torch.randint(0, 37, (2, 12))
    targets = torch.randint(0, 37, (2, 12))
    targets[0, :5] = IGNORE_INDEX
    out = model(tokens, targets)
    keep = targets != IGNORE_INDEX
    expected = F.cross_entropy(out.logits[keep], targets[keep])
    torch.testing.assert_close(out.lm_loss, expected)
    assert set(out.aux_losses) == {"entropy"}
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_losses["entropy"])
    assert out.routing_stats, "a routed model reports its routing statistics"
    model.eval()
    evaluated = model(tokens, targets)
    assert evaluated.aux_losses == {}
    torch.testing.assert_close(evaluated.loss, evaluated.lm_loss)


def test_all_targets_masked_gives_zero_loss(small):
    model = small("decoder", "dense")
    tokens = torch.randint(0, 37, (1, 4))
    out = model(tokens, torch.full_like(tokens, IGNORE_INDEX))
    assert out.lm_loss.item() == 0.0


def test_layers_may_differ(small):
    model = small("transformer_xl", "sigma_moe", layer_ffn={0: {"type": "dense", "d_ff": 40}})
    assert type(model.layers[0].ffn.ffn).__name__ == "DenseFFN"
    assert type(model.layers[1].ffn.ffn).__name__ == "SigmaMoE"
    assert model(torch.randint(0, 37, (1, 5))).logits.shape == (1, 5, 37)


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_tokens_are_clear_errors(small, arch):
    model = small(arch, "dense")
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[0, 37]]))
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


def test_smlp_window_is_a_clear_error(small):
    model = small("smlp", "dense")
    with pytest.raises(ValueError, match="seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_mismatched_xl_memory_is_a_clear_error(small):
    model = small("transformer_xl", "dense")
    state = model(torch.zeros(2, 4, dtype=torch.long)).state
    with pytest.raises(ValueError, match=r"state must be \[B=3"):
        model(torch.zeros(3, 4, dtype=torch.long), state=state)
    with pytest.raises(ValueError, match="one tensor per layer"):
        model(torch.zeros(2, 4, dtype=torch.long), state=state[:1])


@given(length=st.integers(5, 16), seed=st.integers(0, 2**16), data=st.data())
def test_smlp_learned_routing_masks_the_prefix_and_is_causal_after_it(small, length, seed, data):
    """Learned sMoE routing reads a prefix of P = ceil(0.2 * 16) = 4 positions: the loss skips
    those targets, and positions from P on never see later tokens."""
    model = small("smlp", "dense", seed, smlp_routing="learned").eval()
    assert model.prefix_len == 4
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 37, (2, length), generator=g)
    targets = torch.randint(0, 37, (2, length), generator=g)
    out = model(tokens, targets)
    expected = F.cross_entropy(out.logits[:, 4:].reshape(-1, 37), targets[:, 4:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, expected)
    pos = data.draw(st.integers(4, length - 1), label="changed position")
    changed = tokens.clone()
    changed[:, pos] = (changed[:, pos] + 1) % 37
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, 4:pos], b[:, 4:pos])


@pytest.mark.parametrize("arch", ARCHS)
def test_model_code_runs_under_bf16_autocast(small, arch):
    """The model's own code (attention, memory, cache, gating) under mixed precision."""
    model = small(arch, "dense", 0)
    tokens = torch.randint(0, 37, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, tokens, state=model.init_state())
        out = model(tokens, tokens, state=out.state)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("arch", ARCHS)
@given(length=st.integers(1, 16), seed=st.integers(0, 2**16), data=st.data())
def test_odd_sizes_and_all_experts_selected(small, arch, length, seed, data):
    """Odd widths, three heads of odd size, K = E, one-token sequences: every token goes to every
    expert, gradients are finite, and the model stays causal."""
    model = small(
        arch,
        "sigma_moe",
        seed,
        d_model=30,
        n_heads=3,
        d_head=7,
        n_experts=3,
        k=3,
        expert_size=5,
        smlp_d_ff=22,
        smlp_n_chunks=5,
    ).eval()
    tokens = torch.randint(0, 37, (2, length), generator=torch.Generator().manual_seed(seed))
    out = model(tokens, tokens)
    out.loss.backward()
    stats = [
        st_ for name, st_ in out.routing_stats.items() if "smoe" not in name and "attn" not in name
    ]
    assert stats and all(s.expert_counts.tolist() == [2 * length] * 3 for s in stats)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    pos = data.draw(st.integers(0, length - 1), label="changed position")
    changed = tokens.clone()
    changed[:, pos] = (changed[:, pos] + 1) % 37
    with torch.no_grad():
        torch.testing.assert_close(model(changed).logits[:, :pos], out.logits[:, :pos].detach())


TINY = [n for n in moe_models.presets() if n.startswith("tiny-")]


@pytest.mark.parametrize("name", TINY)
def test_every_tiny_preset_is_causal_in_eval_even_where_training_drops_tokens(name):
    """Capacity-limited layers at a capacity that really drops tokens in training: in eval mode
    (no capacity limit by default) a token's logits never depend on later tokens, nor on the
    other sequences of the batch."""
    over = {}
    if moe_models.ffn_name(moe_models.get_config(name).ffn) in ("gshard", "switch"):
        over["capacity_factor"] = 0.25
    torch.manual_seed(0)
    model = moe_models.build(name, vocab_size=50, **over)
    tokens = torch.randint(0, 50, (3, 48), generator=torch.Generator().manual_seed(1))
    if over:
        model.train()(tokens)
        dropped = sum(s.dropped for s in collect_routing_stats(model).values())
        assert dropped > 0, "the test's capacity drops tokens in training"
    model.eval()
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 50
    changed[2] = torch.randint(0, 50, (48,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:2, :-1], b[:2, :-1], rtol=1e-5, atol=1e-5)
