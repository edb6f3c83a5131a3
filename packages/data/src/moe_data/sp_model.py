"""A SentencePiece model file (`.model`, a protobuf `ModelProto`) read without protobuf, and
its BPE segmentation rebuilt as a `tokenizers.Tokenizer` for `tokenizer.json`.

Only the fields the rebuild needs are read: each piece (text, score, type), the trainer's model
type and flags, and the normalizer (its compiled character map and whitespace flags). The
rebuild matches `SentencePieceProcessor.encode` as follows:

- normalisation: the model's compiled character map (`Precompiled`), runs of spaces collapsed,
  leading and trailing spaces removed, "▁" in front and for every space (`Metaspace`);
- segmentation: a `BPE` whose merges are every pair of pieces that joins into a third, ranked
  by that third piece's score, which is the order SentencePiece's BPE merges in; characters
  outside the vocabulary become one <unk> per run, as in SentencePiece;
- decoding: "▁" back to spaces without the first one, <unk> as the model's unknown surface
  (" ⁇ " by default), control pieces (<s>, </s>) as nothing.

Where two different pairs join into the same piece and both are present in one word, the two
libraries may pick them in a different order (SentencePiece the leftmost, `tokenizers` the one
listed first); a control id at the very start of a sequence decodes with a leading space in
`tokenizers`. The tests compare both libraries on real text.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from moe_data.errors import DataError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # SentencePiece.Type
BPE_MODEL = 2
DEFAULT_UNK_SURFACE = " \u2047 "
SPACE = "\u2581"


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for each field of a serialised protobuf message."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 2:
            size = varint()
            yield number, wire, buf[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            yield number, wire, buf[pos : pos + width]
            pos += width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")


@dataclass
class SentencePieceModel:
    """What `tokenizer.json` needs from a `.model` file (proto2 defaults where a field is absent)."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: int = 1
    byte_fallback: bool = False
    whitespace_as_suffix: bool = False
    unk_surface: str = DEFAULT_UNK_SURFACE
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True

    @classmethod
    def parse(cls, proto: bytes) -> SentencePieceModel:
        try:
            return cls._parse(proto)
        except (ValueError, IndexError, struct.error, UnicodeDecodeError) as err:
            raise DataError(f"not a valid SentencePiece model ({err})") from None

    @classmethod
    def _parse(cls, proto: bytes) -> SentencePieceModel:
        model = cls([], [], [])
        for number, _, value in _fields(proto):
            if number == 1:
                piece = {n: v for n, _, v in _fields(value)}
                model.pieces.append(piece[1].decode("utf-8"))
                model.scores.append(struct.unpack("<f", piece.get(2, bytes(4)))[0])
                model.types.append(piece.get(3, NORMAL))
            elif number == 2:
                for n, _, v in _fields(value):
                    if n == 3:
                        model.model_type = v
                    elif n == 24:
                        model.whitespace_as_suffix = bool(v)
                    elif n == 35:
                        model.byte_fallback = bool(v)
                    elif n == 44:
                        model.unk_surface = v.decode("utf-8")
            elif number == 3:
                for n, _, v in _fields(value):
                    if n == 2:
                        model.charsmap = bytes(v)
                    elif n == 3:
                        model.add_dummy_prefix = bool(v)
                    elif n == 4:
                        model.remove_extra_whitespaces = bool(v)
                    elif n == 5:
                        model.escape_whitespaces = bool(v)
        if not model.pieces:
            raise ValueError("it holds no pieces")
        return model


def to_tokenizer(proto: bytes) -> Tokenizer:
    """The `tokenizers` form of a SentencePiece BPE model with the default whitespace handling."""
    m = SentencePieceModel.parse(proto)
    unsupported = {
        "model_type (only BPE)": m.model_type != BPE_MODEL,
        "byte_fallback": m.byte_fallback,
        "treat_whitespace_as_suffix": m.whitespace_as_suffix,
        "add_dummy_prefix=false": not m.add_dummy_prefix,
        "remove_extra_whitespaces=false": not m.remove_extra_whitespaces,
        "escape_whitespaces=false": not m.escape_whitespaces,
        "user-defined symbols": USER_DEFINED in m.types,
    }
    if problems := [name for name, bad in unsupported.items() if bad]:
        raise DataError(
            f"this SentencePiece model cannot be written as tokenizer.json: {', '.join(problems)}"
        )
    vocab = {piece: i for i, piece in enumerate(m.pieces)}
    normal = {p: i for i, (p, t) in enumerate(zip(m.pieces, m.types, strict=True)) if t == NORMAL}
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-m.scores[i], i, left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = m.pieces[m.types.index(UNKNOWN)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True))
    steps = [normalizers.Precompiled(m.charsmap)] if m.charsmap else []
    tok.normalizer = normalizers.Sequence(
        [
            *steps,
            normalizers.Replace(Regex(" {2,}"), " "),
            normalizers.Replace(Regex(r"\A +| +\z"), ""),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")
    controls = [p for p, t in zip(m.pieces, m.types, strict=True) if t == CONTROL]
    tok.decoder = decoders.Sequence(
        [
            decoders.Metaspace(replacement=SPACE, prepend_scheme="always"),
            decoders.Replace(_whole_token([unk]), m.unk_surface),
            *([decoders.Replace(_whole_token(controls), "")] if controls else []),
        ]
    )
    return tok


def _whole_token(pieces: list[str]) -> Regex:
    """Matches a decoded token that is exactly one of `pieces` (not a longer token containing it)."""
    return Regex(r"\A(?:" + "|".join(map(re.escape, pieces)) + r")\z")
