"""Vocabularies: text <-> token ids at word, character, byte, BPE and SentencePiece level.

Each vocabulary knows its `level`, `size`, the smallest unsigned `dtype` that holds its ids,
`encode(text) -> np.ndarray`, `decode(ids) -> str`, a JSON form for the tokenised cache, and
`to_tokenizer()`: the same vocabulary as a Hugging Face `tokenizers.Tokenizer`, which
`save(path)` / `save_tokenizer(vocab, path)` write as `tokenizer.json` and `load_tokenizer(path)`
turns back into the original kind of vocabulary. What `tokenizer.json` reproduces exactly and
what not is told at each `to_tokenizer`.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece
import tokenizers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from moe_data import sp_model
from moe_data.errors import DataError
from moe_data.sources import existing_file, read_bytes

EOS = "<eos>"
UNK = "<unk>"
# every character for which str.isspace() holds: the separators of str.split(), which WordVocab
# splits on, written out so that tokenizer.json splits on the very same set
PY_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    + "".join(map(chr, range(0x2000, 0x200B)))
    + "\u2028\u2029\u202f\u205f\u3000"
)
TOKENIZER_META_FORMAT = "moe-data tokenizer"
SP_BATCH_LINES = 1 << 13


def id_dtype(size: int) -> np.dtype:
    """The smallest integer dtype that stores ids in [0, size): keeps the memory-mapped cache small."""
    if size <= 2**8:
        return np.dtype(np.uint8)
    if size <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _as_id_list(ids) -> list[int]:
    return np.asarray(ids, dtype=np.int64).reshape(-1).tolist()


def check_ids(ids_N: np.ndarray, size: int, origin) -> None:
    """DataError naming `origin` (the file the ids came from) if an id lies outside [0, size)."""
    if ids_N.size == 0:
        return
    low, high = int(ids_N.min()), int(ids_N.max())
    if low < 0 or high >= size:
        bad = high if high >= size else low
        raise DataError(
            f"{origin} holds token id {bad}, outside the vocabulary's range [0, {size})"
        )


def _check_numbering(vocab: dict[str, int], origin) -> None:
    """A token -> id table must number its tokens 0 .. n-1, or ids would exceed the size."""
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        bad = next(i for k, i in enumerate(ids) if i != k)
        raise DataError(
            f"{origin} holds token id {bad}, outside the vocabulary's range [0, {len(ids)})"
            " (its tokens must be numbered 0 .. size - 1)"
        )


def _tokens_by_id(tok: Tokenizer, origin) -> list[str]:
    vocab = tok.get_vocab(with_added_tokens=True)
    _check_numbering(vocab, origin)
    return sorted(vocab, key=vocab.__getitem__)


def _byte_symbols() -> list[str]:
    """The printable stand-in of each byte in byte-level `tokenizers` (GPT-2's table)."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = iter(range(0x100, 0x200))
    return [chr(b) if b in kept else chr(next(shifted)) for b in range(256)]


class CharVocab:
    """Unicode characters (code points), sorted by code point."""

    level = "char"

    def __init__(self, chars: str):
        if not chars:
            raise DataError("a character vocabulary needs at least one character")
        self.chars = chars
        self.codes = np.frombuffer(chars.encode("utf-32-le"), dtype="<u4")
        if np.any(np.diff(self.codes.astype(np.int64)) <= 0):
            raise DataError("a character vocabulary must be sorted and free of duplicates")
        # a code point -> id table (at most 4.4 MB); its last slot, -1, stands for every code
        # point above the vocabulary's largest
        self._table = np.full(int(self.codes[-1]) + 2, -1, dtype=np.int32)
        self._table[self.codes] = np.arange(len(self.codes), dtype=np.int32)

    @classmethod
    def from_codes(cls, codes_N: np.ndarray) -> CharVocab:
        return cls(np.unique(codes_N).astype("<u4").tobytes().decode("utf-32-le"))

    @property
    def size(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> np.dtype:
        return id_dtype(self.size)

    def encode(self, text: str) -> np.ndarray:
        return self.encode_codes(np.frombuffer(text.encode("utf-32-le"), dtype="<u4"))

    def encode_codes(self, codes_N: np.ndarray) -> np.ndarray:
        """Code points (uint32) to ids; any character outside the vocabulary is an error."""
        ids_N = self._table[np.minimum(codes_N, len(self._table) - 1)]
        unknown = ids_N < 0
        if unknown.any():
            missing = sorted(set(codes_N[unknown].tolist()))[:10]
            shown = ", ".join(repr(chr(c)) for c in missing)
            raise DataError(f"text has characters outside the vocabulary: {shown}")
        return ids_N.astype(self.dtype)

    def decode(self, ids) -> str:
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids_N.size and (ids_N.min() < 0 or ids_N.max() >= self.size):
            raise DataError(f"token ids must lie in [0, {self.size}) for this vocabulary")
        return self.codes[ids_N].astype("<u4").tobytes().decode("utf-32-le")

    def to_json(self) -> dict:
        return {"level": self.level, "chars": self.chars}

    def to_tokenizer(self) -> Tokenizer:
        """Exact: one token per character, a character outside the vocabulary is an error.

        (`tokenizers` raises its own exception there, this class a DataError.)
        """
        vocab = {c: i for i, c in enumerate(self.chars)}
        # an unknown token that is no character, so unknown characters fail rather than map to it
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return tok

    def save(self, path) -> Path:
        return save_tokenizer(self, path)


class ByteVocab:
    """The 256 byte values of the UTF-8 encoding; decoding replaces broken sequences."""

    level = "byte"
    size = 256
    dtype = np.dtype(np.uint8)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids_N.size and (ids_N.min() < 0 or ids_N.max() >= 256):
            raise DataError("byte ids must lie in [0, 256)")
        return ids_N.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"level": self.level}

    def to_tokenizer(self) -> Tokenizer:
        """Byte-level BPE without merges: exact for encoding text (ids are the UTF-8 bytes) and
        for decoding, which replaces broken UTF-8 sequences as Python does. `tokenizers` takes
        text only, so bytes that are not UTF-8 (raw enwik8) cannot be encoded through it.
        """
        vocab = {symbol: b for b, symbol in enumerate(_byte_symbols())}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return tok

    def save(self, path) -> Path:
        return save_tokenizer(self, path)


class WordVocab:
    """Whitespace-separated words; every line ends in <eos>, unknown words map to <unk>."""

    level = "word"

    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise DataError("a word vocabulary must not repeat a word")
        for special in (EOS, UNK):
            if special not in self.index:
                raise DataError(f"a word vocabulary must contain {special}")
        self.eos = self.index[EOS]
        self.unk = self.index[UNK]

    @classmethod
    def build(cls, lines: Iterable[str]) -> WordVocab:
        """<eos> first, then words by descending count, ties in order of first appearance."""
        counts = Counter()
        for line in lines:
            counts.update(line.split())
        words = [EOS] + [w for w, _ in counts.most_common() if w != EOS]
        if UNK not in counts:
            words.append(UNK)
        return cls(words)

    @property
    def size(self) -> int:
        return len(self.words)

    @property
    def dtype(self) -> np.dtype:
        return id_dtype(self.size)

    def encode_lines(self, lines: Iterable[str]) -> np.ndarray:
        """The standard WikiText stream: each line's words, then <eos> (empty lines too)."""
        get, unk, eos = self.index.get, self.unk, self.eos
        ids = []
        for line in lines:
            ids.extend(get(w, unk) for w in line.split())
            ids.append(eos)
        return np.array(ids, dtype=self.dtype)

    def encode(self, text: str) -> np.ndarray:
        """Every newline becomes <eos>; text that does not end in a newline gets no final <eos>."""
        *full, last = text.split("\n")
        ids = self.encode_lines(full).astype(np.int64).tolist()
        ids += [self.index.get(w, self.unk) for w in last.split()]
        return np.array(ids, dtype=self.dtype)

    def decode(self, ids) -> str:
        out, line = [], []
        for i in _as_id_list(ids):
            if not 0 <= i < self.size:
                raise DataError(f"token ids must lie in [0, {self.size}) for this vocabulary")
            if i == self.eos:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.words[i])
        out.append(" ".join(line))
        return "".join(out)

    def to_json(self) -> dict:
        return {"level": self.level, "words": self.words}

    def to_tokenizer(self) -> Tokenizer:
        """Exact for encoding and for decoding ids in range: every newline becomes <eos>, words
        split at the characters `str.split` splits at, unknown words become <unk>; decoding
        joins a line's words with one space and ends it at <eos>.

        <eos> and <unk> are ordinary vocabulary entries, not `tokenizers` special tokens (a
        special token would be cut out of the middle of a word, which WordVocab does not do).
        An id outside the vocabulary is skipped by `tokenizers` and an error here.
        """
        tok = Tokenizer(models.WordLevel(vocab=dict(self.index), unk_token=UNK))
        tok.normalizer = normalizers.Replace("\n", f" {EOS} ")
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"[{PY_WHITESPACE}]+"), behavior="removed")
        # words hold no whitespace, so every space next to a newline is one the joining added
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace(Regex(r"\A<eos>\z"), "\n"),
                decoders.WordPiece(prefix=" ", cleanup=False),
                decoders.Fuse(),
                decoders.Replace(" \n", "\n"),
                decoders.Replace("\n ", "\n"),
            ]
        )
        return tok

    def save(self, path) -> Path:
        return save_tokenizer(self, path)


class BPEVocab:
    """A `tokenizers` byte-level BPE: trained here, or loaded from the user's files."""

    level = "bpe"

    def __init__(self, tokenizer: Tokenizer, origin="the tokenizer"):
        _check_numbering(tokenizer.get_vocab(with_added_tokens=True), origin)
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, chunks: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BPEVocab:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size <= len(alphabet):
            raise DataError(
                f"vocab_size={vocab_size} must exceed the {len(alphabet)} byte symbols of a byte-level BPE"
            )
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=alphabet,
            show_progress=False,
        )
        tok.train_from_iterator(chunks, trainer)
        return cls(tok)

    @classmethod
    def from_gpt2_files(cls, vocab_path: str, merges_path: str) -> BPEVocab:
        """GPT-2 style `vocab.json` + `merges.txt`."""
        tok = Tokenizer(models.BPE.from_file(vocab_path, merges_path))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return cls(tok, vocab_path)

    @property
    def size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def dtype(self) -> np.dtype:
        return id_dtype(self.size)

    def encode(self, text: str) -> np.ndarray:
        return np.array(self.tokenizer.encode(text).ids, dtype=self.dtype)

    def encode_chunks(self, chunks: list[str]) -> np.ndarray:
        """Many pieces at once (the library spreads them over threads), concatenated."""
        # the fast variant (tokenizers >= 0.21) skips the character offsets, which are not needed
        encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = encode_batch(chunks)
        return np.fromiter(
            (i for e in encodings for i in e.ids),
            dtype=self.dtype,
            count=sum(len(e) for e in encodings),
        )

    def decode(self, ids) -> str:
        ids = _as_id_list(ids)
        # `tokenizers` would skip an unknown id without a word
        if ids and (min(ids) < 0 or max(ids) >= self.size):
            raise DataError(f"token ids must lie in [0, {self.size}) for this vocabulary")
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def to_json(self) -> dict:
        return {
            "level": self.level,
            "tokenizer": self.tokenizer.to_str(),
            "tokenizers_version": tokenizers.__version__,
        }

    def to_tokenizer(self) -> Tokenizer:
        """Exact: the vocabulary's own `tokenizers` tokenizer."""
        return self.tokenizer

    def save(self, path) -> Path:
        return save_tokenizer(self, path)


class SentencePieceVocab:
    """A SentencePiece model, applied by the `sentencepiece` library; `proto` is its `.model` file.

    No <eos> and no newline token: SentencePiece's default normalisation turns a newline into a
    space and drops spaces at the ends, so line breaks leave no trace in the ids (as in the
    σ-MoE authors' WikiText-103 data). Characters the model does not cover become <unk>
    (id 0), a run of them one <unk>; <unk> decodes as " ⁇ ".
    """

    level = "sp"

    def __init__(self, proto: bytes, origin="the SentencePiece model"):
        self.proto = bytes(proto)
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_proto=self.proto)
        except RuntimeError:
            raise DataError(f"{origin} is not a valid SentencePiece model") from None

    @classmethod
    def train(cls, path: Path, vocab_size: int, options: dict) -> SentencePieceVocab:
        """Train on the text file `path` (SentencePiece reads it line by line itself)."""
        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                input=str(path), model_writer=model, vocab_size=vocab_size, **options
            )
        except RuntimeError as err:
            # "INTERNAL: src/trainer_interface.cc(744) [condition] Vocabulary size too high ..."
            reason = re.sub(r"^\w+: \S+\(\d+\) \[.*?\] ", "", " ".join(str(err).split()))
            raise DataError(
                f"SentencePiece training on {path} with vocab_size={vocab_size} failed: {reason}"
            ) from None
        return cls(model.getvalue())

    def __getstate__(self) -> dict:
        return {"proto": self.proto}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"])

    @property
    def size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def dtype(self) -> np.dtype:
        return id_dtype(self.size)

    def encode(self, text: str) -> np.ndarray:
        return np.array(self.processor.encode(text), dtype=self.dtype)

    def encode_lines(self, lines: list[str]) -> np.ndarray:
        """Each line on its own (as the σ-MoE authors encoded their files), concatenated."""
        parts = [np.zeros(0, dtype=self.dtype)]
        # in batches: the library's Python lists of ids would take ~36 bytes per token
        for start in range(0, len(lines), SP_BATCH_LINES):
            encoded = self.processor.encode(lines[start : start + SP_BATCH_LINES])
            parts.append(
                np.fromiter(
                    (i for ids in encoded for i in ids),
                    dtype=self.dtype,
                    count=sum(len(ids) for ids in encoded),
                )
            )
        return np.concatenate(parts)

    def decode(self, ids) -> str:
        ids = _as_id_list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.size):
            raise DataError(f"token ids must lie in [0, {self.size}) for this vocabulary")
        return self.processor.decode(ids)

    def to_json(self) -> dict:
        return {
            "level": self.level,
            "model": base64.b64encode(self.proto).decode("ascii"),
            "sentencepiece_version": sentencepiece.__version__,
        }

    def to_tokenizer(self) -> Tokenizer:
        """Approximate, see `moe_data.sp_model`: the same ids on the tests' texts, but
        `tokenizers` does not run SentencePiece's algorithm; `load_tokenizer` uses the `.model`
        file saved beside `tokenizer.json` instead, which is exact.
        """
        return sp_model.to_tokenizer(self.proto)

    def save(self, path) -> Path:
        return save_tokenizer(self, path)


def _tokenizer_json(path) -> Path:
    """A path that is a folder, or that does not end in .json, means `tokenizer.json` in it."""
    path = Path(path).expanduser()
    return path / "tokenizer.json" if path.is_dir() or path.suffix != ".json" else path


def _companions(path: Path) -> tuple[Path, Path]:
    """`tokenizer.json` -> (`tokenizer_meta.json`, `tokenizer.model`)."""
    return path.with_name(f"{path.stem}_meta.json"), path.with_suffix(".model")


def save_tokenizer(vocab, path) -> Path:
    """Write `vocab` as a `tokenizers` file at `path`; returns the file's path.

    `path` is the file (`run/tokenizer.json`) or a folder (`run`: any path that is a folder or
    does not end in .json), which gets `tokenizer.json`.

    Beside it go `<stem>_meta.json` (`tokenizer_meta.json`: the level, size and dtype, which
    `load_tokenizer` needs to rebuild the same kind of vocabulary) and, for a SentencePiece
    vocabulary, the model itself as `<stem>.model` (`tokenizer.model`).
    """
    path = _tokenizer_json(path)
    try:
        tok = vocab.to_tokenizer()
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    meta_path, model_path = _companions(path)
    meta = {
        "format": TOKENIZER_META_FORMAT,
        "version": 1,
        "level": vocab.level,
        "size": vocab.size,
        "dtype": vocab.dtype.name,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    if isinstance(vocab, SentencePieceVocab):
        model_path.write_bytes(vocab.proto)
        meta["sentencepiece_model"] = model_path.name
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return path


def load_tokenizer(path):
    """The vocabulary `save_tokenizer` wrote at `path` (the `tokenizer.json`, or its folder).

    It is the same kind as the saved one (`CharVocab`, `ByteVocab`, `WordVocab`, `BPEVocab`,
    `SentencePieceVocab`) with the same level, size, dtype, encode and decode. Without the
    `tokenizer_meta.json` beside it, the file is taken for a subword tokenizer from elsewhere
    and becomes a `BPEVocab` (level "bpe"). Raises DataError naming the file that is missing or
    does not fit.
    """
    path = existing_file(_tokenizer_json(path), "tokenizer file")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:
        raise DataError(
            f"{path} is not a valid tokenizer.json ({str(err).splitlines()[0]})"
        ) from None
    meta_path, model_path = _companions(path)
    if not meta_path.exists():
        return BPEVocab(tok, path)
    try:
        meta = json.loads(read_bytes(meta_path, "tokenizer description").decode("utf-8"))
        level = meta["level"]
        if meta.get("format") != TOKENIZER_META_FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}")
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path} is not a moe-data tokenizer description ({err})") from None
    try:
        model_path = meta_path.parent / meta.get("sentencepiece_model", model_path.name)
        vocab = _vocab_of_level(level, tok, path, model_path)
    except DataError as err:
        message = str(err)
        raise DataError(message if str(path) in message else f"{path}: {message}") from None
    if vocab.size != meta.get("size") or vocab.dtype.name != meta.get("dtype"):
        raise DataError(
            f"{path} holds {vocab.size} tokens ({vocab.dtype.name}) but {meta_path.name} says"
            f" {meta.get('size')} ({meta.get('dtype')}); the two files do not belong together"
        )
    return vocab


def _vocab_of_level(level, tok: Tokenizer, path: Path, model_path: Path):
    if level == "bpe":
        return BPEVocab(tok, path)
    tokens = _tokens_by_id(tok, path)
    if level == "char":
        if any(len(t) != 1 for t in tokens):
            raise DataError("a character-level tokenizer.json must hold single characters")
        return CharVocab("".join(tokens))
    if level == "byte":
        if tokens != _byte_symbols():
            raise DataError("a byte-level tokenizer.json must hold the 256 byte symbols in order")
        return ByteVocab()
    if level == "word":
        return WordVocab(tokens)
    if level == "sp":
        model_path = existing_file(model_path, "SentencePiece model")
        vocab = SentencePieceVocab(read_bytes(model_path), model_path)
        if vocab.size != len(tokens):
            raise DataError(f"{model_path} holds {vocab.size} pieces but {path} {len(tokens)}")
        return vocab
    raise DataError(f"unknown vocabulary level {level!r}")


def vocab_from_json(data: dict):
    """The inverse of each vocabulary's `to_json`."""
    level = data.get("level")
    if level == "char":
        return CharVocab(data["chars"])
    if level == "byte":
        return ByteVocab()
    if level == "word":
        return WordVocab(data["words"])
    if level == "bpe":
        return BPEVocab(Tokenizer.from_str(data["tokenizer"]))
    if level == "sp":
        return SentencePieceVocab(base64.b64decode(data["model"], validate=True))
    raise DataError(f"unknown vocabulary level {level!r} in {json.dumps(data)[:80]}")
