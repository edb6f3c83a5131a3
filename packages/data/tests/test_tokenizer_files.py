"""tokenizer.json: every vocabulary kind saved, loaded back identical, and read by `tokenizers`.

Three encoders are compared on each text: the original vocabulary, the one `load_tokenizer`
gives back, and `tokenizers.Tokenizer.from_file` on the saved file. Where the original raises
(a character outside a character vocabulary) the other two must raise as well.
"""

import gzip
import json
import pickle
import sys

import moe_data
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from moe_data import DataError
from moe_data.vocab import PY_WHITESPACE
from tokenizers import Tokenizer, models, pre_tokenizers

KINDS = ("char", "byte", "word", "bpe", "sp")
ODD_TEXTS = [
    "",
    "In the beginning God created the heaven and the earth.",
    "Ünïcödé ✓ 数据 and zebrafish, quokkas and other unseen words\n",
    "  leading,  double  spaces \t a tab\r\nCRLF\n\n\nblank lines\n",
    "digits 1234567890 and 3.14159, <unk> <eos> written out, a<eos>b\n",
    "separators\x1c\x1d\u3000\u2028\x85 of str.split\n",
]
EXPECTED_CLASS = {
    "char": moe_data.CharVocab,
    "byte": moe_data.ByteVocab,
    "word": moe_data.WordVocab,
    "bpe": moe_data.BPEVocab,
    "sp": moe_data.SentencePieceVocab,
}


def _write_wikitext(folder, train: str, valid: str, test: str):
    folder.mkdir(parents=True, exist_ok=True)
    for split, body in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"wiki.{split}.tokens").write_text(body, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def kjv(tmp_path_factory):
    """The built-in corpus at every level; word and sp levels read it as a WikiText folder."""
    text = gzip.decompress(moe_data.default_corpus_path().read_bytes()).decode("utf-8")
    lines = text.splitlines(keepends=True)
    a, b = int(len(lines) * 0.9), int(len(lines) * 0.95)
    folder = _write_wikitext(
        tmp_path_factory.mktemp("kjv") / "kjv",
        "".join(lines[:a]),
        "".join(lines[a:b]),
        "".join(lines[b:]),
    )
    corpora = {
        "char": moe_data.default_corpus("char", cache_dir=False),
        "byte": moe_data.default_corpus("byte", cache_dir=False),
        "bpe": moe_data.default_corpus("bpe", cache_dir=False),
        "word": moe_data.wikitext(folder, cache_dir=False),
        "sp": moe_data.wikitext_sp(folder, 1000, cache_dir=False),
    }
    return corpora, lines[b:][:400]


@pytest.fixture(scope="module")
def wikitext2(tmp_path_factory, wikitext2_dir):
    """WikiText-2 from shared/ (valid stands in for the missing train file) at every level."""
    folder = tmp_path_factory.mktemp("wt2") / "wikitext-2"
    folder.mkdir()
    for split, source in (("train", "valid"), ("valid", "valid"), ("test", "test")):
        (folder / f"wiki.{split}.tokens").symlink_to(wikitext2_dir / f"wiki.{source}.tokens")
    train = folder / "wiki.train.tokens"
    corpora = {
        "char": moe_data.text(train, "char", cache_dir=False),
        "byte": moe_data.text(train, "byte", cache_dir=False),
        "bpe": moe_data.bpe(train, vocab_size=4096, cache_dir=False),
        "word": moe_data.wikitext(folder, cache_dir=False),
        "sp": moe_data.load(f"wikitext-sp8k:{folder}", cache_dir=False),
    }
    lines = (folder / "wiki.test.tokens").read_text(encoding="utf-8").splitlines(True)
    return corpora, lines[:800], folder


def _outcome(encode, text):
    """The ids as a list, or the exception type."""
    try:
        return [int(i) for i in encode(text)]
    except Exception as err:  # tokenizers raises a bare Exception
        return type(err)


def _check_round_trip(vocab, texts, folder):
    path = moe_data.save_tokenizer(vocab, folder / "tokenizer.json")
    assert path == folder / "tokenizer.json" and path.is_file()
    assert (folder / "tokenizer_meta.json").is_file()
    assert (folder / "tokenizer.model").is_file() == (vocab.level == "sp")
    loaded = moe_data.load_tokenizer(path)
    hf = Tokenizer.from_file(str(path))
    assert type(loaded) is type(vocab) is EXPECTED_CLASS[vocab.level]
    assert (loaded.level, loaded.size, loaded.dtype) == (vocab.level, vocab.size, vocab.dtype)
    assert hf.get_vocab_size() == vocab.size
    encoded = 0
    for text in texts:
        ours = _outcome(vocab.encode, text)
        assert _outcome(loaded.encode, text) == ours, text
        theirs = _outcome(lambda t: hf.encode(t).ids, text)
        if isinstance(ours, type):
            assert ours is DataError and isinstance(theirs, type), text
            continue
        encoded += 1
        assert theirs == ours, text
        assert loaded.decode(ours) == vocab.decode(ours)
        assert hf.decode(ours, skip_special_tokens=False) == vocab.decode(ours), text
    assert encoded >= len(texts) // 2
    for bad in ([vocab.size], [-1]):
        with pytest.raises(DataError):
            loaded.decode(bad)
    return loaded


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_on_the_builtin_corpus(kjv, kind, tmp_path):
    corpora, test_lines = kjv
    vocab = corpora[kind].vocab
    chunk = "".join(test_lines)
    texts = [*test_lines, chunk, *ODD_TEXTS]
    loaded = _check_round_trip(vocab, texts, tmp_path / kind)
    assert loaded.encode(chunk).size > 100


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_on_wikitext2(wikitext2, kind, tmp_path):
    corpora, test_lines, _ = wikitext2
    texts = [*test_lines, "".join(test_lines), *ODD_TEXTS]
    _check_round_trip(corpora[kind].vocab, texts, tmp_path / kind)


def test_sentencepiece_tokenizer_json_reproduces_the_whole_test_split(wikitext2, tmp_path):
    """The approximate part: `tokenizers` rebuilding SentencePiece's BPE, on all 245k pieces."""
    corpora, _, folder = wikitext2
    path = corpora["sp"].vocab.save(tmp_path / "tokenizer.json")
    hf = Tokenizer.from_file(str(path))
    lines = (folder / "wiki.test.tokens").read_text(encoding="utf-8").split("\n")
    assert [i for e in hf.encode_batch(lines) for i in e.ids] == corpora["sp"].test.tolist()


def test_python_whitespace_is_complete():
    assert PY_WHITESPACE == "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())


def _hf(vocab, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return Tokenizer.from_file(str(moe_data.save_tokenizer(vocab, folder)))


spaces = st.sampled_from(list(PY_WHITESPACE) + [" ", "  ", "\n", "\r\n"])
words = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters=PY_WHITESPACE),
    min_size=1,
    max_size=5,
)


@given(
    st.lists(words, min_size=1, max_size=12),
    st.lists(st.tuples(st.one_of(words, st.just("<eos>")), spaces), max_size=20),
)
def test_word_file_matches_word_vocab(tmp_path_factory, train_words, text_parts):
    vocab = moe_data.WordVocab.build([" ".join(train_words)])
    hf = _hf(vocab, tmp_path_factory)
    text = "".join(w + sep for w, sep in text_parts)
    ids = vocab.encode(text).tolist()
    assert hf.encode(text).ids == ids
    assert hf.decode(ids) == vocab.decode(ids)


@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30), st.data())
def test_char_file_matches_char_vocab(tmp_path_factory, alphabet, data):
    vocab = moe_data.CharVocab("".join(sorted(set(alphabet))))
    hf = _hf(vocab, tmp_path_factory)
    text = data.draw(st.text(st.sampled_from(vocab.chars), max_size=50))
    ids = vocab.encode(text).tolist()
    assert hf.encode(text).ids == ids
    assert hf.decode(ids) == vocab.decode(ids) == text


@pytest.fixture(scope="module")
def byte_file(tmp_path_factory):
    return _hf(moe_data.ByteVocab(), tmp_path_factory)


@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=60), st.binary(max_size=30))
def test_byte_file_matches_byte_vocab(byte_file, text, raw):
    vocab = moe_data.ByteVocab()
    assert byte_file.encode(text).ids == vocab.encode(text).tolist() == list(text.encode())
    # broken UTF-8 is replaced as Python replaces it
    assert byte_file.decode(list(raw)) == vocab.decode(np.frombuffer(raw, np.uint8))


def _numbered_with_a_gap(path):
    """A word-level tokenizer whose ids skip 2..6, so id 7 lies beyond its 3 tokens."""
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 7}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def test_ids_beyond_the_vocabulary_name_the_file(tmp_path, write):
    path = _numbered_with_a_gap(tmp_path / "gappy.json")
    with pytest.raises(DataError, match=r"gappy.json holds token id 7, outside .*\[0, 3\)"):
        moe_data.load_tokenizer(path)
    corpus = write("c.txt", "a b a b\n" * 40)
    with pytest.raises(DataError, match=r"gappy.json holds token id 7"):
        moe_data.bpe(corpus, tokenizer=str(path))


def test_load_errors_name_the_file(tmp_path, kjv):
    corpora, _ = kjv
    with pytest.raises(DataError, match="tokenizer file .*nothing.json does not exist"):
        moe_data.load_tokenizer(tmp_path / "nothing.json")
    (tmp_path / "broken.json").write_text("{ not json")
    with pytest.raises(DataError, match="broken.json is not a valid tokenizer.json"):
        moe_data.load_tokenizer(tmp_path / "broken.json")

    sp = moe_data.save_tokenizer(corpora["sp"].vocab, tmp_path / "sp")
    (tmp_path / "sp" / "tokenizer.model").unlink()
    with pytest.raises(DataError, match="SentencePiece model .*tokenizer.model does not exist"):
        moe_data.load_tokenizer(sp)

    word = moe_data.save_tokenizer(corpora["word"].vocab, tmp_path / "word")
    meta_path = tmp_path / "word" / "tokenizer_meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "size": meta["size"] + 1}))
    with pytest.raises(DataError, match="do not belong together"):
        moe_data.load_tokenizer(word)
    meta_path.write_text(json.dumps({**meta, "level": "char"}))
    with pytest.raises(DataError, match="tokenizer.json: a character-level tokenizer.json must"):
        moe_data.load_tokenizer(word)
    meta_path.write_text("[]")
    with pytest.raises(DataError, match="tokenizer_meta.json is not a moe-data tokenizer"):
        moe_data.load_tokenizer(word)


def test_folder_paths_and_foreign_files(tmp_path, kjv):
    corpora, _ = kjv
    assert moe_data.save_tokenizer(corpora["word"].vocab, tmp_path) == tmp_path / "tokenizer.json"
    assert isinstance(moe_data.load_tokenizer(tmp_path), moe_data.WordVocab)
    # a tokenizer.json from elsewhere, without our description beside it, is a subword tokenizer
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    corpora["bpe"].vocab.tokenizer.save(str(foreign / "tokenizer.json"))
    loaded = moe_data.load_tokenizer(foreign / "tokenizer.json")
    assert loaded.level == "bpe" and loaded.size == corpora["bpe"].vocab_size


def test_sentencepiece_vocab_pickles(kjv):
    vocab = kjv[0]["sp"].vocab
    back = pickle.loads(pickle.dumps(vocab))
    text = "And God said, Let there be light: and there was light. 1234"
    assert back.encode(text).tolist() == vocab.encode(text).tolist()


def test_unsupported_sentencepiece_model_is_refused(tmp_path, write):
    path = write(
        "u.txt", "".join(ODD_TEXTS) * 20 + "the quick brown fox jumps over the lazy dog\n" * 50
    )
    unigram = moe_data.SentencePieceVocab.train(
        path, 60, {"model_type": "unigram", "minloglevel": 2}
    )
    with pytest.raises(DataError, match="cannot be written as tokenizer.json: model_type"):
        unigram.save(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_reads_the_file(kjv, kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    corpora, lines = kjv
    vocab = corpora[kind].vocab
    path = moe_data.save_tokenizer(vocab, tmp_path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    text = "".join(lines[:20])
    assert fast.encode(text, add_special_tokens=False) == vocab.encode(text).tolist()
