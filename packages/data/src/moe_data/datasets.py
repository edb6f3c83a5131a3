"""The data sets: WikiText (word, or SentencePiece as the σ-MoE authors tokenised it), enwik8
(byte), any text file (char / byte), BPE, the default.

Every loader returns a `Corpus` and goes through the tokenised cache (see `moe_data.cache`).
"""

from __future__ import annotations

import math
from importlib.resources import files
from pathlib import Path

import numpy as np
import sentencepiece
import tokenizers
from tokenizers import Tokenizer

from moe_data.cache import cached
from moe_data.corpus import Corpus
from moe_data.errors import DataError
from moe_data.sources import (
    decode_utf8,
    existing_file,
    existing_folder,
    read_bytes,
    read_zip_member,
    universal_lines,
)
from moe_data.vocab import BPEVocab, ByteVocab, CharVocab, SentencePieceVocab, WordVocab

SPLITS = ("train", "valid", "test")
DEFAULT_SPLIT = (0.9, 0.05, 0.05)
ENWIK8_SIZES = (90_000_000, 5_000_000, 5_000_000)
DEFAULT_BPE_VOCAB = 4096
BPE_CHUNK_CHARS = 1 << 12
SIGMA_MOE_SP_PIECES = 8000
# The σ-MoE authors' SentencePiece training (their dataset/text/tokenizers/sentencepiece.py and
# tasks/simple/language_model/wikitext103_sp_transformer.py): a BPE model with digits split, of
# 8000 pieces, on wiki.train.tokens, every other option at SentencePiece's default. Those
# defaults that decide the pieces are written out, so a changed default cannot change them;
# the last one only silences the trainer's log.
SIGMA_MOE_SP_OPTIONS = {
    "model_type": "bpe",
    "split_digits": True,
    "character_coverage": 0.9995,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": True,
    "split_by_whitespace": True,
    "split_by_unicode_script": True,
    "split_by_number": True,
    "max_sentencepiece_length": 16,
    "max_sentence_length": 4192,
    "input_sentence_size": 0,
    "byte_fallback": False,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "minloglevel": 2,
}


def split_sizes(n: int, split, path) -> tuple[int, int, int]:
    """Contiguous train / valid / test lengths for `n` items: floor of each fraction, test the rest."""
    try:
        fractions = tuple(float(f) for f in split)
    except (TypeError, ValueError):
        raise DataError(
            f"split must be three fractions (train, valid, test), not {split!r}"
        ) from None
    if len(fractions) != 3 or any(not math.isfinite(f) or f <= 0 for f in fractions):
        raise DataError(
            f"split must be three positive fractions (train, valid, test), not {split!r}"
        )
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"split fractions must add up to 1, not {sum(fractions):g} ({split!r})")
    n_train = int(n * fractions[0])
    n_valid = int(n * fractions[1])
    n_test = n - n_train - n_valid
    if min(n_train, n_valid, n_test) < 1:
        raise DataError(
            f"{path} is too short ({n} tokens) to split {fractions} into non-empty train, valid and test"
        )
    return n_train, n_valid, n_test


def _cut(array, sizes) -> dict:
    a, b, _ = sizes
    return {"train": array[:a], "valid": array[a : a + b], "test": array[a + b :]}


def text(path, level: str = "char", split=DEFAULT_SPLIT, *, cache_dir=None) -> Corpus:
    """A UTF-8 text file (gzip if it ends in .gz) at character or byte level.

    The first `split[0]` of the characters (bytes) is train, the next `split[1]` valid, the
    rest test. The character vocabulary is every character of the whole file, so the valid and
    test splits hold no unknown symbol.
    """
    if level not in ("char", "byte"):
        raise DataError(f"level must be 'char' or 'byte' for a text file, not {level!r}")
    src = existing_file(path, "text file")

    def build():
        data = read_bytes(src)
        if level == "byte":
            vocab, ids = ByteVocab(), np.frombuffer(data, dtype=np.uint8)
        else:
            codes = np.frombuffer(decode_utf8(data, src).encode("utf-32-le"), dtype="<u4")
            vocab = CharVocab.from_codes(codes)
            ids = vocab.encode_codes(codes)
        return vocab, _cut(ids, split_sizes(len(ids), split, src))

    split_sizes(10**6, split, src)
    key = {"kind": "text", "level": level, "split": list(split)}
    vocab, arrays = cached(cache_dir, f"{src.name}-{level}", key, [src], build)
    return Corpus(_stem(src), vocab, **arrays)


def enwik8(path, *, sizes=ENWIK8_SIZES, cache_dir=None) -> Corpus:
    """enwik8 at byte level (256 symbols) from the raw file or enwik8.zip: 90M / 5M / 5M bytes.

    `sizes` exists for tests and look-alike files; the file must hold exactly sum(sizes) bytes.
    """
    src = existing_file(path, "enwik8 file")
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != 3 or min(sizes) < 1:
        raise DataError(f"sizes must be three positive byte counts, not {sizes!r}")

    def build():
        is_zip = src.suffix == ".zip"
        data = read_zip_member(src, "enwik8") if is_zip else read_bytes(src)
        if len(data) != sum(sizes):
            raise DataError(
                f"{src} holds {len(data):,} bytes but the enwik8 split {sizes} needs {sum(sizes):,}"
                " (is this the enwik8 file?)"
            )
        return ByteVocab(), _cut(np.frombuffer(data, dtype=np.uint8), sizes)

    key = {"kind": "enwik8", "sizes": list(sizes)}
    vocab, arrays = cached(cache_dir, "enwik8", key, [src], build)
    return Corpus("enwik8", vocab, **arrays)


def _wikitext_paths(folder) -> tuple[Path, dict[str, Path]]:
    root = existing_folder(folder, "WikiText folder")
    paths = {}
    for split in SPLITS:
        p = root / f"wiki.{split}.tokens"
        if p.exists() or p.is_symlink():
            existing_file(p, "WikiText file")
        else:
            hint = " (the vocabulary is built from the training split)" if split == "train" else ""
            raw = (
                " (found .raw files: use the tokenised .tokens release)"
                if any(root.glob("*.raw"))
                else ""
            )
            raise DataError(f"WikiText file {p} does not exist{hint}{raw}")
        paths[split] = p
    return root, paths


def wikitext(folder, *, cache_dir=None) -> Corpus:
    """WikiText-2 / -103 at word level from `wiki.{train,valid,test}.tokens` in `folder`.

    The vocabulary comes from train (<eos> first, then by frequency); every line, empty ones
    included, ends in <eos>; <unk> is an ordinary token, and words unseen in train become <unk>.
    """
    root, paths = _wikitext_paths(folder)

    def build():
        lines = {s: universal_lines(decode_utf8(read_bytes(p), p)) for s, p in paths.items()}
        vocab = WordVocab.build(lines["train"])
        return vocab, {s: vocab.encode_lines(lines[s]) for s in SPLITS}

    vocab, arrays = cached(
        cache_dir, f"wikitext-{root.name}", {"kind": "wikitext"}, list(paths.values()), build
    )
    return Corpus(root.name, vocab, **arrays)


def wikitext_sp(folder, vocab_size: int = SIGMA_MOE_SP_PIECES, *, cache_dir=None) -> Corpus:
    """WikiText as the σ-MoE authors tokenised it: a SentencePiece BPE of `vocab_size` pieces
    (8000 in their WikiText-103 runs) trained on `wiki.train.tokens` alone with their options
    (`SIGMA_MOE_SP_OPTIONS`), then every line of each split encoded on its own.

    Level "sp": no <eos> and no newline token (SentencePiece's normalisation drops line ends);
    report perplexity per piece. Training on WikiText-103 reads the whole 0.5 GB train file into
    SentencePiece (minutes, a few GB of memory); the cache keeps the model and the ids.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise DataError(f"vocab_size must be a positive integer, not {vocab_size!r}")
    root, paths = _wikitext_paths(folder)

    def lines(split: str) -> list[str]:
        # with their newlines, as the authors' text-mode file iteration passed them
        return universal_lines(decode_utf8(read_bytes(paths[split]), paths[split]), keepends=True)

    def build():
        for split in SPLITS:  # a bad file fails before the long training, not after it
            lines(split)
        vocab = SentencePieceVocab.train(paths["train"], vocab_size, SIGMA_MOE_SP_OPTIONS)
        return vocab, {split: vocab.encode_lines(lines(split)) for split in SPLITS}

    key = {
        "kind": "wikitext-sp",
        "vocab_size": vocab_size,
        "options": SIGMA_MOE_SP_OPTIONS,
        "sentencepiece": sentencepiece.__version__,
    }
    vocab, arrays = cached(
        cache_dir, f"wikitext-sp{vocab_size}-{root.name}", key, list(paths.values()), build
    )
    return Corpus(root.name, vocab, **arrays)


def _chunks(text: str) -> list[str]:
    """Pieces of about BPE_CHUNK_CHARS that end on a newline, so the tokenizer can run them in parallel."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + BPE_CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def _load_tokenizer(tokenizer) -> tuple[BPEVocab, list[Path], dict]:
    """A user-supplied tokenizer: tokenizer.json, or GPT-2 (vocab.json, merges.txt)."""
    if isinstance(tokenizer, (str, Path)):
        p = existing_file(tokenizer, "tokenizer file")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as err:
            raise DataError(
                f"{p} is not a valid tokenizer.json ({str(err).splitlines()[0]})"
            ) from None
        return BPEVocab(tok, p), [p], {"tokenizer": "json"}
    if isinstance(tokenizer, (tuple, list)) and len(tokenizer) == 2:
        vocab_p = existing_file(tokenizer[0], "BPE vocab file")
        merges_p = existing_file(tokenizer[1], "BPE merges file")
        try:
            vocab = BPEVocab.from_gpt2_files(str(vocab_p), str(merges_p))
        except DataError:
            raise
        except Exception as err:
            raise DataError(
                f"{vocab_p} + {merges_p} are not a valid GPT-2 vocab.json + merges.txt"
                f" ({str(err).splitlines()[0]})"
            ) from None
        return vocab, [vocab_p, merges_p], {"tokenizer": "gpt2"}
    raise DataError(
        "tokenizer must be None (train one), a tokenizer.json path or (vocab.json, merges.txt),"
        f" not {tokenizer!r}"
    )


def bpe(
    path,
    tokenizer=None,
    vocab_size: int = DEFAULT_BPE_VOCAB,
    split=DEFAULT_SPLIT,
    *,
    min_frequency: int = 2,
    cache_dir=None,
) -> Corpus:
    """A UTF-8 text file tokenised with byte-level BPE.

    With `tokenizer=None` a BPE of `vocab_size` is trained on the train split (so valid and
    test do not leak into the merges); otherwise `tokenizer` is a `tokenizer.json` path or a
    `(vocab.json, merges.txt)` pair and `vocab_size` is ignored. The split is by characters.
    """
    src = existing_file(path, "text file")
    if tokenizer is None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
            raise DataError(
                f"vocab_size must be an integer above 256 for byte-level BPE, not {vocab_size!r}"
            )
        given, tok_sources = None, []
        key = {"kind": "bpe", "vocab_size": vocab_size, "min_frequency": min_frequency}
    else:
        given, tok_sources, key = _load_tokenizer(tokenizer)
        key["kind"] = "bpe"
    key |= {"split": list(split), "tokenizers": tokenizers.__version__, "chunk": BPE_CHUNK_CHARS}
    split_sizes(10**6, split, src)

    def build():
        body = decode_utf8(read_bytes(src), src)
        parts = _cut(body, split_sizes(len(body), split, src))
        vocab = given or BPEVocab.train(_chunks(parts["train"]), vocab_size, min_frequency)
        return vocab, {s: vocab.encode_chunks(_chunks(parts[s])) for s in SPLITS}

    vocab, arrays = cached(cache_dir, f"{src.name}-bpe", key, [src, *tok_sources], build)
    return Corpus(_stem(src), vocab, **arrays)


def default_corpus_path() -> Path:
    """The built-in corpus: King James Bible (public domain), 18 books, ~2.1 MB, gzip."""
    return Path(str(files("moe_data") / "corpora" / "kjv.txt.gz"))


def default_corpus(level: str = "char", *, cache_dir=None) -> Corpus:
    """The built-in corpus at "char" (default, 74 symbols), "byte" or "bpe" (vocabulary of 2048) level."""
    if level in ("char", "byte"):
        corpus = text(default_corpus_path(), level, cache_dir=cache_dir)
    elif level == "bpe":
        corpus = bpe(default_corpus_path(), vocab_size=2048, cache_dir=cache_dir)
    else:
        raise DataError(f"the default corpus comes at level 'char', 'byte' or 'bpe', not {level!r}")
    corpus.name = "kjv"
    corpus.spec = "default" if level == "char" else f"default:{level}"
    return corpus


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".txt", ".tokens"):
        name = name.removesuffix(suffix)
    return name
