"""Generation with the XL memory / KV cache agrees with re-running the model on the whole text."""

import moe_models
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_models.config import ARCHS


def greedy_by_full_recompute(model, prompt, n):
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=6)
@given(prompt_len=st.integers(1, 8), new=st.integers(0, 7), seed=st.integers(0, 2**16))
def test_greedy_generation_matches_full_recompute(small, arch, prompt_len, new, seed):
    """Within the memory / window, incremental decoding sees exactly the full context."""
    model = small(arch, "sigma_moe", seed, mem_len=16).eval()
    prompt = torch.randint(0, 37, (2, prompt_len), generator=torch.Generator().manual_seed(seed))
    out = moe_models.generate(model, prompt, new, greedy=True)
    assert out.shape == (2, prompt_len + new)
    assert torch.equal(out[:, :prompt_len], prompt)
    assert torch.equal(out, greedy_by_full_recompute(model, prompt, new))


def test_xl_reads_long_prompts_segment_by_segment(small):
    """A prompt longer than seq_len goes through the memory as in training."""
    model = small("transformer_xl", "dense", 0).eval()
    prompt = torch.randint(0, 37, (1, 40))
    out = moe_models.generate(model, prompt, 3, greedy=True)
    with torch.no_grad():
        state = None
        for seg in prompt.split(16, dim=1):
            last = model(seg, state=state)
            state = last.state
    assert out[0, 40] == last.logits[0, -1].argmax()


def test_sampling_is_reproducible_with_a_generator_and_respects_top_k(small):
    model = small("decoder", "dense", 0)
    model.train()
    prompt = torch.randint(0, 37, (3, 4))
    a = moe_models.generate(model, prompt, 6, top_k=1, generator=torch.Generator().manual_seed(1))
    assert model.training, "generate restores the training mode"
    assert torch.equal(a, moe_models.generate(model, prompt, 6, greedy=True))
    b = moe_models.generate(
        model, prompt, 6, temperature=2.0, top_k=5, generator=torch.Generator().manual_seed(7)
    )
    c = moe_models.generate(
        model, prompt, 6, temperature=2.0, top_k=5, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(b, c)


def test_top_p_sampling_only_picks_from_the_nucleus(small):
    """Each pick lies in the smallest set of most likely tokens whose mass reaches top_p."""
    model = small("decoder", "dense", 0).eval()
    prompt = torch.randint(0, 37, (64, 3))
    with torch.no_grad():
        probs = model(prompt).logits[:, -1].float().softmax(-1)
    out = moe_models.generate(
        model, prompt, 1, top_p=0.5, generator=torch.Generator().manual_seed(0)
    )
    for row in range(64):
        order = probs[row].argsort(descending=True)
        mass = probs[row][order].cumsum(0)
        nucleus = order[: int((mass < 0.5).sum()) + 1]
        assert out[row, -1] in nucleus


def test_stream_yields_the_tokens_generate_returns(small):
    model = small("smlp", "dense", 0).eval()
    prompt = torch.randint(0, 37, (2, 20))
    streamed = list(moe_models.stream(model, prompt, 5, greedy=True))
    assert torch.equal(
        torch.stack(streamed, 1), moe_models.generate(model, prompt, 5, greedy=True)[:, 20:]
    )


def test_top_k_sampling_only_picks_among_the_k_best(small):
    model = small("decoder", "dense", 0).eval()
    prompt = torch.randint(0, 37, (64, 3))
    with torch.no_grad():
        top3 = model(prompt).logits[:, -1].topk(3, dim=-1).indices
    out = moe_models.generate(
        model, prompt, 1, top_k=3, temperature=5.0, generator=torch.Generator().manual_seed(0)
    )
    assert (out[:, -1:] == top3).any(-1).all()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=float("inf")), "temperature"),
    ],
)
def test_bad_generation_options_are_clear_errors(small, kwargs, message):
    model = small("decoder", "dense", 0)
    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        moe_models.generate(
            model, torch.zeros(1, 2, dtype=torch.long), args.pop("max_new_tokens"), **args
        )
    with pytest.raises(ValueError, match="prompt must be"):
        moe_models.generate(model, torch.zeros(1, 0, dtype=torch.long), 1)
