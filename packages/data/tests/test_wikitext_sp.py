"""wikitext-sp: WikiText in the σ-MoE authors' SentencePiece tokenisation, against a plain
re-computation that follows their recipe (SentencePiece trained on the train file with their
three options, then each line of a file, as text-mode iteration gives it, encoded on its own)."""

import gzip
import io
import pickle

import moe_data
import pytest
import sentencepiece as spm
from moe_data import DataError

SPLITS = ("train", "valid", "test")


def reference(folder, vocab_size):
    """The authors' recipe written out independently: (pieces, {split: ids})."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(folder / "wiki.train.tokens"),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        split_digits=True,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    ids = {}
    for split in SPLITS:
        with open(folder / f"wiki.{split}.tokens", encoding="utf-8") as f:
            ids[split] = [i for line in f for i in sp.encode_as_ids(line)]
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())], ids


def _kjv_lines():
    text = gzip.decompress(moe_data.default_corpus_path().read_bytes()).decode("utf-8")
    return text.splitlines(keepends=True)


@pytest.fixture
def small_wikitext(tmp_path):
    """WikiText-shaped: headings, blank lines, numbers, <unk>, CRLF, no final newline in test."""
    lines = _kjv_lines()
    extra = " = Section 12 = \n\n The year 1611 saw <unk> print 31,102 verses . \r\n"
    bodies = {
        "train": extra + "".join(lines[:1500]),
        "valid": extra + "".join(lines[1500:1600]),
        "test": "".join(lines[1600:1700]) + " last line without newline ✓",
    }
    folder = tmp_path / "wikitext-small"
    folder.mkdir()
    for split, body in bodies.items():
        (folder / f"wiki.{split}.tokens").write_bytes(body.encode("utf-8"))
    return folder


def test_matches_the_authors_recipe(small_wikitext):
    corpus = moe_data.wikitext_sp(small_wikitext, 400)
    pieces, ids = reference(small_wikitext, 400)
    assert corpus.level == "sp" and corpus.vocab_size == 400 and corpus.name == "wikitext-small"
    assert [corpus.vocab.processor.id_to_piece(i) for i in range(400)] == pieces
    for split in SPLITS:
        assert corpus.split(split).tolist() == ids[split], split
    assert corpus.train.dtype == corpus.vocab.dtype
    assert all(len(corpus.split(s)) > 0 for s in SPLITS)


def test_prompts_encode_as_the_stream_does(small_wikitext):
    corpus = moe_data.wikitext_sp(small_wikitext, 400)
    test_text = (small_wikitext / "wiki.test.tokens").read_text(encoding="utf-8")
    assert corpus.encode(test_text).tolist() == corpus.test.tolist()
    # no newline token: the decoded stream is the text with its line breaks gone
    assert "\n" not in corpus.decode(corpus.test)
    assert corpus.decode(corpus.encode("In the beginning 1611")) == "In the beginning 1611"


def test_spec_strings_and_cache(small_wikitext, monkeypatch):
    calls = []
    original = moe_data.SentencePieceVocab.train

    def counting(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(moe_data.SentencePieceVocab, "train", counting)
    spec = f"wikitext-sp400:{small_wikitext}"
    first = moe_data.load(spec)
    second = moe_data.load(spec)
    assert len(calls) == 1 and first.spec == spec
    assert isinstance(second.vocab, moe_data.SentencePieceVocab)
    assert second.train.tolist() == first.train.tolist()
    assert pickle.loads(pickle.dumps(second)).valid.tolist() == first.valid.tolist()
    assert moe_data.load(f"wikitext-sp1k:{small_wikitext}").vocab_size == 1000
    assert [args[1] for args in calls] == [400, 1000]


def test_options_change_the_cache_entry(small_wikitext):
    a = moe_data.wikitext_sp(small_wikitext, 300)
    b = moe_data.wikitext_sp(small_wikitext, 400)
    assert (a.vocab_size, b.vocab_size) == (300, 400)
    assert len(a.train) > len(b.train)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("wikitext-sp:{folder}", "needs a vocabulary size, as in wikitext-sp8k:FOLDER"),
        ("wikitext-sp0:{folder}", "needs a vocabulary size"),
        ("wikitext-sp8k:", "wikitext-sp8k needs a FOLDER"),
        ("wikitext-sp50k:{folder}", "vocab_size=50000 failed: Vocabulary size too high (50000)"),
        ("wikitext-sp8k:/no/such/folder", "WikiText folder /no/such/folder does not exist"),
        ("wikitext-spx:{folder}", "unknown kind 'wikitext-spx'"),
    ],
)
def test_bad_specs(small_wikitext, spec, message):
    with pytest.raises(DataError) as err:
        moe_data.load(spec.format(folder=small_wikitext))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files_fail_before_training(small_wikitext, monkeypatch):
    monkeypatch.setattr(moe_data.SentencePieceVocab, "train", pytest.fail)
    (small_wikitext / "wiki.test.tokens").write_bytes(b"\xff broken")
    with pytest.raises(DataError, match="wiki.test.tokens is not UTF-8"):
        moe_data.wikitext_sp(small_wikitext, 400)
    with pytest.raises(DataError, match="vocab_size must be a positive integer"):
        moe_data.wikitext_sp(small_wikitext, "8000")


def test_wikitext2_sp8k(tmp_path, wikitext2_dir):
    """The real options at the real size on WikiText-2 (valid stands in for train)."""
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    for split, source in (("train", "valid"), ("valid", "valid"), ("test", "test")):
        (folder / f"wiki.{split}.tokens").symlink_to(wikitext2_dir / f"wiki.{source}.tokens")
    corpus = moe_data.load(f"wikitext-sp8k:{folder}")
    pieces, ids = reference(folder, 8000)
    assert corpus.vocab_size == 8000 and corpus.level == "sp"
    assert [corpus.vocab.processor.id_to_piece(i) for i in range(8000)] == pieces
    for split in SPLITS:
        assert corpus.split(split).tolist() == ids[split], split
    assert corpus.decode(corpus.valid[:6]).startswith("= Homarus gammarus =")
