"""Every tokenizer round-trips, and the vectorised character encoder agrees with a plain one."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from moe_data import BPEVocab, ByteVocab, CharVocab, DataError, WordVocab

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


def reference_char_encode(vocab_chars: str, text: str) -> list[int]:
    index = {c: i for i, c in enumerate(vocab_chars)}
    return [index[c] for c in text]


@given(texts, texts)
def test_char_round_trip_and_matches_reference(seen, extra):
    vocab = CharVocab.from_codes(np.frombuffer((seen + extra + "a").encode("utf-32-le"), "<u4"))
    ids = vocab.encode(seen)
    assert ids.tolist() == reference_char_encode(vocab.chars, seen)
    assert vocab.decode(ids) == seen
    assert vocab.size == len(set(seen + extra + "a"))


def test_char_unknown_character_is_named():
    vocab = CharVocab("abc")
    with pytest.raises(DataError, match="'z'"):
        vocab.encode("abz")


@given(texts)
def test_byte_round_trip(text):
    ids = ByteVocab().encode(text)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert ByteVocab().decode(ids) == text


words = st.text(
    st.characters(whitelist_categories=("Ll", "Lu", "Nd", "Po")), min_size=1, max_size=6
)
lines = st.lists(st.lists(words, max_size=6), min_size=1, max_size=8)


@given(lines, st.booleans())
def test_word_ids_round_trip(train_lines, trailing_newline):
    vocab = WordVocab.build(" ".join(line) for line in train_lines)
    text = "\n".join(" ".join(line) for line in train_lines) + ("\n" if trailing_newline else "")
    ids = vocab.encode(text)
    assert vocab.encode(vocab.decode(ids)).tolist() == ids.tolist()
    assert vocab.decode(ids) == text
    assert (ids == vocab.eos).sum() == text.count("\n")


def test_word_unknown_becomes_unk_and_eos_is_first():
    vocab = WordVocab.build(["the cat sat", "the dog"])
    assert vocab.words[0] == "<eos>" and vocab.words[1] == "the"
    ids = vocab.encode("the zebra\n")
    assert ids.tolist() == [vocab.index["the"], vocab.unk, vocab.eos]


def test_word_encode_lines_counts_empty_lines():
    vocab = WordVocab.build(["a b"])
    assert vocab.encode_lines(["a b", "", " "]).tolist() == [1, 2, 0, 0, 0]


@pytest.fixture(scope="module")
def small_bpe():
    corpus = ["the quick brown fox jumps over the lazy dog\n" * 20, "ünïcödé ✓ 数据 \t tabs\n" * 5]
    return BPEVocab.train(corpus, vocab_size=300, min_frequency=1)


@given(texts)
def test_bpe_round_trip(small_bpe, text):
    ids = small_bpe.encode(text)
    assert small_bpe.decode(ids) == text
    assert small_bpe.decode(small_bpe.encode_chunks([text[:3], text[3:]])) == text


def test_bpe_learns_merges(small_bpe):
    assert small_bpe.size == 300
    assert len(small_bpe.encode("the quick brown fox")) < len("the quick brown fox")


def test_bpe_vocab_size_must_exceed_bytes():
    with pytest.raises(DataError, match="vocab_size=100"):
        BPEVocab.train(["abc"], vocab_size=100)
