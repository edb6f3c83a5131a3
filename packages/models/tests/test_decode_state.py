"""Generation states that compute nothing again: the Transformer-XL's XLCache (keys and values
of the memory, relative positions once per length), the decoder's preallocated key/value cache,
the sMLP's token window. Their logits are those of the plain state (the XL memory) or of reading
the whole text again, step by step, also past the memory and the window."""

import moe_models
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_models.generate import feed
from moe_models.transformer_xl import XLCache


def steps(model, prompt, n, state):
    """Logits [B, V] of the prompt's last token and of n greedy steps after it, with `state`."""
    out = feed(model, prompt, state)
    logits = [out.logits[:, -1]]
    for _ in range(n):
        out = model(logits[-1].argmax(-1, keepdim=True), state=out.state)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), out.state


@settings(max_examples=8, deadline=None)
@given(
    prompt_len=st.integers(1, 40),
    new=st.integers(1, 24),
    mem_len=st.sampled_from([0, 3, 16]),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
@torch.no_grad()
def test_xl_cache_logits_equal_the_memory_states(small, prompt_len, new, mem_len, batch, seed):
    model = small("transformer_xl", "sigma_moe", seed, mem_len=mem_len).eval()
    prompt = torch.randint(
        0, 37, (batch, prompt_len), generator=torch.Generator().manual_seed(seed)
    )
    cached, state = steps(model, prompt, new, model.init_state())
    assert isinstance(state, XLCache)
    # the memory state: a list of layer inputs, rebuilt at every call (as training feeds it)
    memory = None
    for segment in prompt.split(model.config.seq_len, dim=1):
        out = model(segment, state=memory)
        memory = out.state
    plain = [out.logits[:, -1]]
    for _ in range(new):
        out = model(plain[-1].argmax(-1, keepdim=True), state=memory)
        memory = out.state
        plain.append(out.logits[:, -1])
    torch.testing.assert_close(cached, torch.stack(plain, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["decoder", "smlp"])
@settings(max_examples=6, deadline=None)
@given(prompt_len=st.integers(1, 16), new=st.integers(1, 20), seed=st.integers(0, 2**16))
@torch.no_grad()
def test_cached_logits_equal_reading_the_text_again(small, arch, prompt_len, new, seed):
    """Each step against the model run on the whole text (its last seq_len tokens for the
    sMLP, whose window slides; the decoder's sinusoidal positions go past seq_len)."""
    model = small(arch, "dense", seed).eval()
    prompt = torch.randint(0, 37, (2, prompt_len), generator=torch.Generator().manual_seed(seed))
    cached, _ = steps(model, prompt, new, model.init_state())
    text = prompt
    for i in range(new + 1):
        window = text if arch == "decoder" else text[:, -model.config.seq_len :]
        torch.testing.assert_close(cached[:, i], model(window).logits[:, -1], rtol=1e-5, atol=1e-5)
        text = torch.cat([text, cached[:, i].argmax(-1, keepdim=True)], dim=1)


@pytest.mark.parametrize("arch", ["transformer_xl", "decoder", "smlp"])
@torch.no_grad()
def test_a_state_continued_twice_gives_both_continuations_their_own_logits(small, arch):
    model = small(arch, "dense", 0).eval()
    g = torch.Generator().manual_seed(0)
    prompt, a, b = (torch.randint(0, 37, (2, n), generator=g) for n in (5, 3, 4))
    state = feed(model, prompt, model.init_state()).state
    first = feed(model, a, state)
    second = feed(model, b, state)  # the same state again: in place writes must not clobber
    again = feed(model, a, state)
    torch.testing.assert_close(again.logits, first.logits, rtol=0, atol=0)
    fresh = feed(model, torch.cat([prompt, b], 1), model.init_state())
    torch.testing.assert_close(second.logits, fresh.logits[:, -4:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_an_xl_step_projects_only_its_new_token_and_positions_once(small):
    """A decode step's key/value projections see one row per sequence, and the relative
    positions are projected at the prompt (once per model length), not at every step."""
    model = small("transformer_xl", "dense", 0, mem_len=8).eval()
    attn = model.layers[0].attn
    rows_seen, position_calls = [], []
    attn.k.register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[1]))
    attn.r.register_forward_hook(lambda m, args, out: position_calls.append(args[0].shape[0]))
    out = feed(model, torch.zeros(1, 5, dtype=torch.long), model.init_state())
    prompt_calls = len(position_calls)
    for _ in range(30):  # past the memory: the window slides and its buffer is renewed
        out = model(torch.zeros(1, 1, dtype=torch.long), state=out.state)
    assert rows_seen == [5] + [1] * 30
    assert len(position_calls) == prompt_calls
    # trained further, the projection is computed afresh
    attn.r.weight.add_(0.0)  # in place under no_grad, as an optimiser step
    model(torch.zeros(1, 1, dtype=torch.long), state=out.state)
    assert len(position_calls) == prompt_calls + 1


@torch.no_grad()
def test_generate_uses_the_cache_states(small):
    for arch, kind in [("transformer_xl", XLCache), ("decoder", list)]:
        model = small(arch, "dense", 0).eval()
        out = feed(model, torch.zeros(1, 3, dtype=torch.long), model.init_state())
        assert isinstance(out.state, kind)
    assert (
        len(moe_models.generate(model, torch.zeros(1, 3, dtype=torch.long), 4, greedy=True)[0]) == 7
    )
