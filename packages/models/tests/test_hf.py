"""The transformers classes (moe_models.hf): a saved checkpoint loads through AutoModelForCausalLM
with our logits, and its greedy generate gives our tokens, for every architecture."""

import os

import moe_models
import pytest
import torch
from moe_models.config import ARCHS
from moe_models.generate import feed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("moe_models.hf")

FFN = {"transformer_xl": "sigma_moe", "decoder": "gshard", "smlp": "tmoe", "moeut": "sigma_moe"}


@pytest.fixture(scope="module", autouse=True)
def registered():
    hf.register()
    hf.register()  # twice does no harm


def saved(small, tmp_path, arch, **overrides):
    ours = small(arch, FFN[arch], 2, **overrides).eval()
    hf.MoEForCausalLM.from_moe_model(ours).save_pretrained(tmp_path)
    return ours, transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_classes_load_our_logits_and_greedy_tokens(small, tmp_path, arch):
    ours, theirs = saved(small, tmp_path, arch, tie_embeddings=arch == "decoder")
    assert isinstance(theirs, hf.MoEForCausalLM)
    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path), hf.MoEConfig)
    if arch == "decoder":
        assert theirs.model.head.weight is theirs.model.embedding.weight
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 37, (2, 11), generator=gen)
    with torch.no_grad():
        assert torch.equal(theirs(tokens).logits, ours(tokens).logits)
    # longer than seq_len (16): the XL memory and the sMLP window carry the prompt over
    prompt = torch.randint(0, 37, (2, 21), generator=gen)
    expected = moe_models.generate(ours, prompt, 9, greedy=True)
    got = theirs.generate(prompt, max_new_tokens=9, do_sample=False)
    assert torch.equal(got, expected)


def test_forward_continues_from_the_cache_it_returned(small, tmp_path):
    ours, theirs = saved(small, tmp_path, "transformer_xl")
    tokens = torch.randint(0, 37, (1, 20))
    with torch.no_grad():
        first = theirs(tokens[:, :13], use_cache=True)
        assert first.cache.get_seq_length() == 13
        second = theirs(tokens[:, 13:], cache=first.cache)
        whole = feed(ours, tokens).logits
    assert torch.allclose(torch.cat([first.logits, second.logits], 1), whole, atol=1e-5)


def test_labels_give_the_shifted_lm_loss(small, tmp_path):
    ours, theirs = saved(small, tmp_path, "decoder")
    tokens = torch.randint(0, 37, (2, 10))
    with torch.no_grad():
        loss = theirs(tokens, labels=tokens).loss
        ref = ours(tokens[:, :-1], tokens[:, 1:])
    assert float(loss) == pytest.approx(float(ref.loss), rel=1e-5)


def test_padding_is_refused(small, tmp_path):
    _, theirs = saved(small, tmp_path, "smlp")
    tokens = torch.randint(0, 37, (2, 6))
    mask = torch.ones_like(tokens)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        theirs(tokens, attention_mask=mask)


def test_beam_search_with_the_cache_equals_recomputing(small, tmp_path):
    """Beam search reorders the cache (MoEState.reorder_cache); without a cache every step reads
    the whole text again, which inside the context is the same model."""
    _, theirs = saved(small, tmp_path, "decoder")
    prompt = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(1))
    options = dict(max_new_tokens=6, num_beams=3, do_sample=False, num_return_sequences=2)
    cached = theirs.generate(prompt, **options)
    recomputed = theirs.generate(prompt, use_cache=False, **options)
    assert torch.equal(cached, recomputed)


def test_the_state_follows_batch_reordering():
    state = hf.MoEState([torch.arange(6.0).view(3, 2, 1)], seen=2)
    state.reorder_cache(torch.tensor([2, 0, 1]))
    assert state.state[0][:, 0, 0].tolist() == [4.0, 0.0, 2.0]
    state.batch_repeat_interleave(2)
    assert state.state[0][:, 0, 0].tolist() == [4.0, 4.0, 0.0, 0.0, 2.0, 2.0]
    state.batch_select_indices(torch.tensor([1, 4]))
    assert state.state[0][:, 0, 0].tolist() == [4.0, 2.0] and state.get_seq_length() == 2
