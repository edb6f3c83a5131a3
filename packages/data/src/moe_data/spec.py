"""`load(spec)`: the CLI's `--data KIND:PATH` strings turned into corpora."""

from __future__ import annotations

import re
from pathlib import Path

from moe_data import datasets
from moe_data.corpus import Corpus
from moe_data.errors import DataError

KINDS = {
    "wikitext": ("FOLDER", lambda p, c: datasets.wikitext(p, cache_dir=c)),
    "enwik8": ("PATH", lambda p, c: datasets.enwik8(p, cache_dir=c)),
    "text": ("PATH", lambda p, c: datasets.text(p, "char", cache_dir=c)),
    "bytes": ("PATH", lambda p, c: datasets.text(p, "byte", cache_dir=c)),
    "bpe": ("PATH", lambda p, c: datasets.bpe(p, cache_dir=c)),
}
DEFAULT_LEVELS = ("char", "byte", "bpe")
# wikitext-sp8k (the σ-MoE authors' 8000 pieces), or any other count: wikitext-sp500, wikitext-sp16k
WIKITEXT_SP = re.compile(r"wikitext-sp(?:(\d+)(k?))?")


def _usage() -> str:
    kinds = ", ".join(f"{k}:{arg}" for k, (arg, _) in KINDS.items())
    return f"{kinds}, wikitext-sp8k:FOLDER, or default (also default:byte, default:bpe)"


def _wikitext_sp(spec: str, match: re.Match, folder: str, cache_dir) -> Corpus:
    count, thousands = match.groups()
    if count is None or int(count) == 0:
        raise DataError(
            f"--data {spec!r}: wikitext-sp needs a vocabulary size, as in wikitext-sp8k:FOLDER"
            " (8000 pieces) or wikitext-sp500:FOLDER"
        )
    if not folder:
        raise DataError(
            f"--data {spec!r}: {match.group(0)} needs a FOLDER, as in wikitext-sp8k:FOLDER"
        )
    return datasets.wikitext_sp(
        folder, int(count) * (1000 if thousands else 1), cache_dir=cache_dir
    )


def load(spec: str | None, cache_dir=None) -> Corpus:
    """The corpus a `--data` value names.

    `wikitext:FOLDER`, `wikitext-sp8k:FOLDER` (WikiText in the σ-MoE authors' SentencePiece
    tokenisation of 8000 pieces; `wikitext-spN` / `wikitext-spNk` for N / N thousand pieces),
    `enwik8:PATH`, `text:PATH` (characters), `bytes:PATH` (a text file at byte level),
    `bpe:PATH` (byte-level BPE trained on the file), and None / "default" for the built-in
    corpus at character level ("default:byte", "default:bpe" for the other levels).
    Raises DataError with a one-line message for an unknown kind or a missing path.
    """
    if spec is not None and not isinstance(spec, str):
        raise DataError(f"--data must be a string such as text:PATH, not {spec!r}")
    if spec is None or spec.strip() in ("", "default"):
        return datasets.default_corpus("char", cache_dir=cache_dir)
    kind, sep, rest = spec.strip().partition(":")
    if kind == "default":
        if rest not in DEFAULT_LEVELS:
            raise DataError(
                f"--data {spec!r}: the default corpus level must be one of {DEFAULT_LEVELS}"
            )
        return datasets.default_corpus(rest, cache_dir=cache_dir)
    if not sep:
        hint = f" (to train on that file, write text:{spec})" if Path(spec).is_file() else ""
        raise DataError(f"--data {spec!r} is not KIND:PATH{hint}; expected one of {_usage()}")
    if match := WIKITEXT_SP.fullmatch(kind):
        corpus = _wikitext_sp(spec, match, rest, cache_dir)
        corpus.spec = spec.strip()
        return corpus
    if kind not in KINDS:
        raise DataError(f"--data {spec!r}: unknown kind {kind!r}; expected one of {_usage()}")
    arg, loader = KINDS[kind]
    if not rest:
        raise DataError(f"--data {spec!r}: {kind} needs a {arg}, as in {kind}:{arg}")
    corpus = loader(rest, cache_dir)
    corpus.spec = spec.strip()
    return corpus
