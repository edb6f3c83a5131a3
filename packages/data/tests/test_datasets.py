"""Loaders: token counts and splits against plain re-computations, and an error for each bad file."""

import gzip
import os
import shutil
import zipfile
from pathlib import Path

import moe_data
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from moe_data import DataError

SAMPLE = "In the beginning was the Word.\nÜnïcödé: ✓ 数据\n" * 40


def expected_split(n, fractions=(0.9, 0.05, 0.05)):
    a, b = int(n * fractions[0]), int(n * fractions[1])
    return a, b, n - a - b


@pytest.mark.parametrize("gz", [False, True])
def test_text_char_level(write, gz):
    path = write("book.txt.gz", gzip.compress(SAMPLE.encode())) if gz else write("book.txt", SAMPLE)
    corpus = moe_data.text(path)
    assert corpus.level == "char" and corpus.name == "book"
    assert corpus.vocab_size == len(set(SAMPLE))
    a, b, c = expected_split(len(SAMPLE))
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (a, b, c)
    assert corpus.decode(corpus.train) == SAMPLE[:a]
    assert corpus.decode(corpus.valid) == SAMPLE[a : a + b]
    assert corpus.decode(corpus.test) == SAMPLE[a + b :]
    at = SAMPLE.index("the Word")
    assert corpus.encode("the Word").tolist() == corpus.train[at : at + 8].tolist()


@given(
    st.tuples(st.integers(1, 20), st.integers(1, 20), st.integers(1, 20)),
    st.sampled_from(["char", "byte"]),
)
def test_text_split_fractions(tmp_path_factory, weights, level):
    path = tmp_path_factory.mktemp("split") / "t.txt"
    path.write_text(SAMPLE, encoding="utf-8")
    fractions = tuple(w / sum(weights) for w in weights)
    corpus = moe_data.text(path, level, split=fractions, cache_dir=False)
    units = SAMPLE if level == "char" else SAMPLE.encode()
    sizes = (len(corpus.train), len(corpus.valid), len(corpus.test))
    assert sum(sizes) == len(units)
    assert all(abs(s - f * len(units)) <= 2 for s, f in zip(sizes, fractions, strict=True))
    whole = np.concatenate([corpus.train, corpus.valid, corpus.test])
    assert whole.tolist() == (corpus.encode(SAMPLE)).tolist()


def test_text_byte_level(write):
    corpus = moe_data.text(write("b.txt", SAMPLE), level="byte")
    assert corpus.level == "byte" and corpus.vocab_size == 256
    raw = SAMPLE.encode()
    a, b, _ = expected_split(len(raw))
    assert corpus.train.tobytes() == raw[:a] and corpus.test.tobytes() == raw[a + b :]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.txt", "does not exist"),
        (lambda d: d, "is a folder"),
        (lambda d: _put(d / "empty.txt", b""), "is empty"),
        (lambda d: _put(d / "bin.txt", b"ok\xff\xfe"), "not UTF-8 text .* offset 2"),
        (lambda d: _put(d / "bad.txt.gz", b"not gzip at all"), "not a valid gzip"),
        (lambda d: _put(d / "short.txt", b"ab"), "too short"),
    ],
)
def test_text_bad_files(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        moe_data.text(path)
    assert str(path.name) in str(err.value)


def test_unreadable_file_is_named(write, monkeypatch):
    path = write("locked.txt", SAMPLE)
    real_open = os.open

    def deny(file, *args, **kwargs):
        if Path(file).name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(DataError, match="locked.txt is not readable"):
        moe_data.text(path, cache_dir=False)


@pytest.mark.parametrize(
    "split, message",
    [
        ((0.5, 0.5), "three positive"),
        ((0.9, 0.2, 0.1), "add up to 1"),
        ((1.0, 0.0, 0.0), "positive"),
    ],
)
def test_text_bad_split(write, split, message):
    with pytest.raises(DataError, match=message):
        moe_data.text(write("s.txt", SAMPLE), split=split)


def test_text_bad_level(write):
    with pytest.raises(DataError, match="level"):
        moe_data.text(write("s.txt", SAMPLE), level="word")


def _put(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


SIZES = (900, 50, 50)


def _enwik8_bytes(n=1000, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("zipped", [False, True])
def test_enwik8_split(write, tmp_path, zipped):
    raw = _enwik8_bytes()
    if zipped:
        path = tmp_path / "enwik8.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("enwik8", raw)
    else:
        path = write("enwik8", raw)
    corpus = moe_data.enwik8(path, sizes=SIZES)
    assert corpus.level == "byte" and corpus.vocab_size == 256
    assert corpus.train.tobytes() == raw[:900]
    assert corpus.valid.tobytes() == raw[900:950]
    assert corpus.test.tobytes() == raw[950:]


def test_enwik8_standard_sizes(write):
    path = write("enwik8", np.zeros(100_000_000, dtype=np.uint8).tobytes())
    corpus = moe_data.enwik8(path, cache_dir=False)
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (
        90_000_000,
        5_000_000,
        5_000_000,
    )


def test_enwik8_bad_files(write, tmp_path):
    with pytest.raises(DataError, match="1,001 bytes .* needs 1,000"):
        moe_data.enwik8(write("enwik8", _enwik8_bytes(1001)), sizes=SIZES)
    with pytest.raises(DataError, match="100,000,000"):
        moe_data.enwik8(write("enwik8b", _enwik8_bytes(10)))
    with pytest.raises(DataError, match="not a valid zip"):
        moe_data.enwik8(write("broken.zip", b"PK\x03\x04 nonsense"), sizes=SIZES)
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(DataError, match="no member 'enwik8'"):
        moe_data.enwik8(other, sizes=SIZES)
    with pytest.raises(DataError, match="does not exist"):
        moe_data.enwik8(tmp_path / "nope")


WT_TRAIN = " = Title = \n\n the cat sat on the mat . \n the dog <unk> . \n"
WT_VALID = " the cat ran . \n\n a zebra ! \n"


def _wikitext_folder(root: Path, train=WT_TRAIN, valid=WT_VALID, test=WT_VALID) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, body in (("train", train), ("valid", valid), ("test", test)):
        if body is not None:
            (root / f"wiki.{split}.tokens").write_text(body, encoding="utf-8")
    return root


def test_wikitext_synthetic(tmp_path):
    corpus = moe_data.wikitext(_wikitext_folder(tmp_path / "wt"))
    vocab = corpus.vocab
    assert corpus.level == "word" and corpus.name == "wt"
    train_words = [w for line in WT_TRAIN.split("\n")[:-1] for w in [*line.split(), "<eos>"]]
    assert len(corpus.train) == len(train_words)
    assert [vocab.words[i] for i in corpus.train] == train_words
    assert vocab.words[0] == "<eos>" and vocab.words[1] == "the"
    valid_words = [
        w if w in vocab.index else "<unk>"
        for line in WT_VALID.split("\n")[:-1]
        for w in [*line.split(), "<eos>"]
    ]
    assert [vocab.words[i] for i in corpus.valid] == valid_words
    assert "<unk>" in valid_words and corpus.vocab_size == len(set(train_words))


def test_wikitext_errors(tmp_path):
    with pytest.raises(DataError, match="folder .* does not exist"):
        moe_data.wikitext(tmp_path / "absent")
    no_train = _wikitext_folder(tmp_path / "a", train=None)
    with pytest.raises(DataError, match=r"wiki.train.tokens does not exist .*vocabulary"):
        moe_data.wikitext(no_train)
    empty_test = _wikitext_folder(tmp_path / "b", test="")
    with pytest.raises(DataError, match=r"wiki.test.tokens is empty"):
        moe_data.wikitext(empty_test)
    binary = _wikitext_folder(tmp_path / "c")
    (binary / "wiki.valid.tokens").write_bytes(b"\x80\x81 binary")
    with pytest.raises(DataError, match=r"wiki.valid.tokens is not UTF-8"):
        moe_data.wikitext(binary)


def test_wikitext2_published_counts(tmp_path, wikitext2_dir):
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    for split in ("valid", "test"):
        (folder / f"wiki.{split}.tokens").symlink_to(wikitext2_dir / f"wiki.{split}.tokens")
    # the shared folder has no train file; valid stands in for it to build a vocabulary
    shutil.copyfile(wikitext2_dir / "wiki.valid.tokens", folder / "wiki.train.tokens")
    corpus = moe_data.wikitext(folder)
    assert len(corpus.valid) == 217_646
    assert len(corpus.test) == 245_569
    assert corpus.decode(corpus.valid[:5]) == "\n= Homarus gammarus ="


def test_bpe_trained_and_loaded_tokenizers_agree(write, tmp_path):
    path = write("corpus.txt", SAMPLE * 3)
    trained = moe_data.bpe(path, vocab_size=300)
    assert trained.level == "bpe" and trained.vocab_size <= 300
    for split in ("train", "valid", "test"):
        ids = trained.split(split)
        assert trained.encode(trained.decode(ids)).tolist() == ids.tolist()
    n = len(SAMPLE * 3)
    a, b, _ = expected_split(n)
    assert trained.decode(trained.valid) == (SAMPLE * 3)[a : a + b]

    tok_json = tmp_path / "tokenizer.json"
    trained.vocab.tokenizer.save(str(tok_json))
    from_json = moe_data.bpe(path, tokenizer=str(tok_json))
    assert from_json.train.tolist() == trained.train.tolist()

    vocab_file, merges_file = trained.vocab.tokenizer.model.save(str(tmp_path))
    from_gpt2 = moe_data.bpe(path, tokenizer=(vocab_file, merges_file))
    assert from_gpt2.test.tolist() == trained.test.tolist()


def test_bpe_bad_tokenizers(write, tmp_path):
    path = write("corpus.txt", SAMPLE)
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        moe_data.bpe(path, tokenizer=str(write("tokenizer.json", "{not json")))
    with pytest.raises(DataError, match="BPE merges file .* does not exist"):
        moe_data.bpe(path, tokenizer=(str(write("vocab.json", "{}")), str(tmp_path / "merges.txt")))
    with pytest.raises(DataError, match="not a valid GPT-2"):
        moe_data.bpe(
            path, tokenizer=(str(write("v.json", "[1, 2]")), str(write("m.txt", "#version\n")))
        )
    with pytest.raises(DataError, match="vocab_size"):
        moe_data.bpe(path, vocab_size=200)
    with pytest.raises(DataError, match="tokenizer must be"):
        moe_data.bpe(path, tokenizer=42)


def test_default_corpus_char():
    corpus = moe_data.default_corpus()
    assert corpus.level == "char" and corpus.name == "kjv" and corpus.spec == "default"
    assert 2 <= corpus.vocab_size < 256
    total = len(corpus.train) + len(corpus.valid) + len(corpus.test)
    assert 1_000_000 <= total <= 3_000_000
    assert corpus.decode(corpus.train[:9]) == "Genesis 1"
    notes = moe_data.default_corpus_path().parent / "README.md"
    assert "public domain" in notes.read_text().lower()


def test_default_corpus_byte_matches_char():
    chars, raw = moe_data.default_corpus("char"), moe_data.default_corpus("byte")
    assert raw.level == "byte" and raw.spec == "default:byte"
    assert chars.decode(chars.valid[:500]).encode() == raw.valid[:500].tobytes()
