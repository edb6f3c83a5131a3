"""Vocabularies: text <-> token ids at word, character, byte and BPE level.

Each vocabulary knows its `level`, `size`, the smallest unsigned `dtype` that holds its ids,
`encode(text) -> np.ndarray`, `decode(ids) -> str`, and a JSON form for the tokenised cache.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe_data.errors import DataError

EOS = "<eos>"
UNK = "<unk>"


def id_dtype(size: int) -> np.dtype:
    """The smallest integer dtype that stores ids in [0, size): keeps the memory-mapped cache small."""
    if size <= 2**8:
        return np.dtype(np.uint8)
    if size <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _as_id_list(ids) -> list[int]:
    return np.asarray(ids, dtype=np.int64).reshape(-1).tolist()


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


class BPEVocab:
    """A `tokenizers` byte-level BPE: trained here, or loaded from the user's files."""

    level = "bpe"

    def __init__(self, tokenizer: Tokenizer):
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
        return cls(tok)

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
        return self.tokenizer.decode(_as_id_list(ids), skip_special_tokens=False)

    def to_json(self) -> dict:
        return {
            "level": self.level,
            "tokenizer": self.tokenizer.to_str(),
            "tokenizers_version": tokenizers.__version__,
        }


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
    raise DataError(f"unknown vocabulary level {level!r} in {json.dumps(data)[:80]}")
