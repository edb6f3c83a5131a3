"""`load(spec)`: the CLI's --data strings, and one-line errors for bad ones."""

import pickle

import moe_data
import pytest
from moe_data import DataError

TEXT = "Some text to train on.\n" * 30


def test_default_specs():
    for spec in (None, "default", " default "):
        corpus = moe_data.load(spec)
        assert corpus.name == "kjv" and corpus.level == "char" and corpus.spec == "default"
    assert moe_data.load("default:byte").level == "byte"


def test_kinds(write, tmp_path):
    path = write("t.txt", TEXT)
    assert moe_data.load(f"text:{path}").level == "char"
    assert moe_data.load(f"bytes:{path}").level == "byte"
    bpe = moe_data.load(f"bpe:{path}")
    assert bpe.level == "bpe" and bpe.spec == f"bpe:{path}"
    folder = tmp_path / "wt"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"wiki.{split}.tokens").write_text(" a b \n", encoding="utf-8")
    assert moe_data.load(f"wikitext:{folder}").level == "word"
    with pytest.raises(DataError, match="100,000,000"):
        moe_data.load(f"enwik8:{path}")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nonsense:abc", "unknown kind 'nonsense'; expected one of wikitext:FOLDER"),
        ("text:", "text needs a PATH"),
        ("wikitext:/no/such/folder", "WikiText folder /no/such/folder does not exist"),
        ("text:/no/such/file.txt", "text file /no/such/file.txt does not exist"),
        ("default:word", "default corpus level"),
        ("just-a-word", "is not KIND:PATH"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(DataError) as err:
        moe_data.load(spec)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_non_string_spec():
    with pytest.raises(DataError, match="must be a string"):
        moe_data.load(42)


def test_bare_existing_path_gets_a_hint(write):
    path = write("t.txt", TEXT)
    with pytest.raises(DataError, match=f"write text:{path}"):
        moe_data.load(str(path))


def test_corpus_pickles(write):
    corpus = moe_data.load(f"text:{write('t.txt', TEXT)}")
    back = pickle.loads(pickle.dumps(corpus))
    assert back.train.tolist() == corpus.train.tolist()
    assert back.decode(back.valid) == corpus.decode(corpus.valid)
    assert back.spec == corpus.spec
    bpe = moe_data.load(f"bpe:{write('b.txt', TEXT)}")
    assert (
        pickle.loads(pickle.dumps(bpe)).encode("Some text").tolist()
        == bpe.encode("Some text").tolist()
    )
