"""moe-data: tokenisation throughput (MB/s) and batching throughput (tokens/s) on the default corpus.

Tokenisation rows encode the whole built-in corpus (~2.1 MB of text) with each vocabulary; the
character encoder is also timed against a plain dict lookup (its readable reference). BPE rows
time training a 2048-symbol byte-level BPE on the train split and encoding the whole text.
Batching rows cut the train split (~1.9M character tokens) into [32, 256] int64 batches, in
memory and memory-mapped from the cache, for one XL epoch and as many random-window batches.
Source-check rows time what a cache hit costs on a large byte-level source (256 MB, 64 MB with
--quick): the SHA-256 of the source in 4 MiB chunks (the staleness check), the size and mtime
stat it replaced, and a whole cache-hit `moe_data.text` load (source hash, entry checksums, id
range check).
All callables of a table run round-robin (`time_interleaved`); medians with min / max.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import moe_data  # noqa: E402
from moe_data.sources import read_bytes  # noqa: E402
from moe_data.vocab import BPEVocab, ByteVocab, CharVocab, WordVocab  # noqa: E402
from timing import time_interleaved  # noqa: E402

BATCH, SEQ = 32, 256


def _rate_rows(timings: dict, amounts: dict, unit: str, per: float) -> list[dict]:
    rows = []
    for name, t in timings.items():
        seconds = t["median_ms"] / 1e3
        rows.append(
            {
                "case": name,
                unit: round(amounts[name] / per / seconds, 2),
                "median_ms": round(t["median_ms"], 2),
                "min_ms": round(t["min_ms"], 2),
                "max_ms": round(t["max_ms"], 2),
            }
        )
    return rows


def tokenisation_rows(repeats: int) -> list[dict]:
    text = read_bytes(moe_data.default_corpus_path()).decode("utf-8")
    megabytes = len(text.encode("utf-8"))
    char = CharVocab.from_codes(np.frombuffer(text.encode("utf-32-le"), "<u4"))
    index = {c: i for i, c in enumerate(char.chars)}
    word = WordVocab.build(text.split("\n"))
    train_text = text[: int(0.9 * len(text))]
    chunks = moe_data.datasets._chunks(text)
    char_ids = char.encode(text)
    bpe = BPEVocab.train(moe_data.datasets._chunks(train_text), 2048)
    fns = {
        "char encode": lambda: char.encode(text),
        "char encode (dict reference)": lambda: np.array([index[c] for c in text], dtype=np.uint8),
        "char decode": lambda: char.decode(char_ids),
        "byte encode": lambda: ByteVocab().encode(text),
        "word encode": lambda: word.encode(text),
        "bpe train (2048, train split)": lambda: BPEVocab.train(
            moe_data.datasets._chunks(train_text), 2048
        ),
        "bpe encode": lambda: bpe.encode_chunks(chunks),
    }
    amounts = {name: megabytes for name in fns}
    amounts["bpe train (2048, train split)"] = len(train_text.encode("utf-8"))
    rows = _rate_rows(time_interleaved(fns, repeats, warmup=1), amounts, "MB/s", 1e6)
    for row in rows:
        row["table"] = "tokenisation"
    return rows


def batching_rows(repeats: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as cache:
        corpus = moe_data.default_corpus(cache_dir=cache)
        in_memory = np.array(corpus.train)
        xl_mem = moe_data.XLBatcher(in_memory, BATCH, SEQ)
        xl_map = moe_data.XLBatcher(corpus.train, BATCH, SEQ)
        n_batches = len(xl_mem)
        windows = moe_data.RandomWindowBatcher(in_memory, BATCH, SEQ, seed=0)
        windows_map = moe_data.RandomWindowBatcher(corpus.train, BATCH, SEQ, seed=0)

        def drain(batcher):
            return lambda: sum(x.shape[1] for x, _ in batcher)

        def take(batcher):
            return lambda: [next(batcher) for _ in range(n_batches)]

        fns = {
            "xl epoch (in memory)": drain(xl_mem),
            "xl epoch (memory-mapped)": drain(xl_map),
            "random windows (in memory)": take(windows),
            "random windows (memory-mapped)": take(windows_map),
        }
        tokens = BATCH * SEQ * n_batches
        rows = _rate_rows(
            time_interleaved(fns, repeats, warmup=1), dict.fromkeys(fns, tokens), "Mtokens/s", 1e6
        )
    for row in rows:
        row["table"] = f"batching [{BATCH}, {SEQ}]"
    return rows


def source_check_rows(repeats: int, megabytes: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "large.txt"
        block = np.random.default_rng(0).integers(32, 127, 1 << 20, dtype=np.uint8).tobytes()
        with open(source, "wb") as f:
            for _ in range(megabytes):
                f.write(block)
        cache = Path(tmp) / "cache"
        moe_data.text(source, level="byte", cache_dir=cache)
        fns = {
            "sha256 of the source (the check)": lambda: moe_data.cache.sha256_of(source),
            "stat: size + mtime (the old check)": lambda: source.stat().st_mtime_ns,
            "cache-hit load (whole)": lambda: moe_data.text(source, level="byte", cache_dir=cache),
        }
        size = megabytes * (1 << 20)
        rows = _rate_rows(
            time_interleaved(fns, repeats, warmup=1), dict.fromkeys(fns, size), "MB/s", 1e6
        )
    for row in rows:
        row["table"] = f"token cache source check ({megabytes} MiB)"
    return rows


def run(quick: bool) -> list[dict]:
    repeats = 3 if quick else 5
    return (
        tokenisation_rows(repeats)
        + batching_rows(repeats)
        + source_check_rows(repeats, 64 if quick else 256)
    )
