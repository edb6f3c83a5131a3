"""`Corpus`: the three token splits of one data set together with its vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVELS = ("word", "char", "byte", "bpe", "sp")


@dataclass(eq=False)
class Corpus:
    """Train / valid / test token streams (1-D integer arrays, possibly memory-mapped).

    `level` is one of "word", "char", "byte", "bpe", "sp" (SentencePiece): the trainer reports
    bits per character for "char" and "byte" and perplexity (per token) otherwise. `vocab` is
    the vocabulary object; `moe_data.save_tokenizer(corpus.vocab, run_dir / "tokenizer.json")`
    writes it for the run. `spec` is the `--data` string that rebuilds this corpus through
    `moe_data.load`, where there is one.
    """

    name: str
    vocab: object
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    spec: str | None = None

    @property
    def level(self) -> str:
        return self.vocab.level

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    def encode(self, text: str) -> np.ndarray:
        """Text to ids (for prompts); at word level unknown words become <unk>."""
        return self.vocab.encode(text)

    def decode(self, ids) -> str:
        return self.vocab.decode(ids)

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "valid", "test"):
            raise ValueError(f"split must be 'train', 'valid' or 'test', not {name!r}")
        return getattr(self, name)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={len(getattr(self, s)):,}" for s in ("train", "valid", "test"))
        return (
            f"Corpus({self.name!r}, level={self.level!r}, vocab_size={self.vocab_size}, {counts})"
        )
