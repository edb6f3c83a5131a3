"""moe-data: corpora, tokenizers, LM batching and priming tasks for MoE language models.

Corpora: `wikitext(folder)`, `wikitext_sp(folder, vocab_size)`, `enwik8(path)`,
`text(path, level)`, `bpe(path, tokenizer)`, `default_corpus(level)` and `load(spec)` for the
CLI's `--data` strings; each returns a `Corpus`. Tokenizers: `save_tokenizer(vocab, path)` and
`load_tokenizer(path)` (Hugging Face `tokenizer.json` with a `tokenizer_meta.json` beside it).
Batching: `XLBatcher` (Transformer-XL streams) and `RandomWindowBatcher` (decoder LMs).
Priming: `load_tasks`, `build_prompt`, `example_task_path`. No torch here: batches are numpy.
"""

import importlib.metadata

from moe_data.batching import RandomWindowBatcher, XLBatcher
from moe_data.cache import default_cache_dir
from moe_data.corpus import LEVELS, Corpus
from moe_data.datasets import (
    bpe,
    default_corpus,
    default_corpus_path,
    enwik8,
    text,
    wikitext,
    wikitext_sp,
)
from moe_data.errors import DataError
from moe_data.sources import read_text
from moe_data.spec import load
from moe_data.tasks import Example, Task, build_prompt, example_task_path, load_tasks
from moe_data.vocab import (
    BPEVocab,
    ByteVocab,
    CharVocab,
    SentencePieceVocab,
    WordVocab,
    load_tokenizer,
    save_tokenizer,
)

__version__ = importlib.metadata.version("moe-data")

__all__ = [
    "LEVELS",
    "BPEVocab",
    "ByteVocab",
    "CharVocab",
    "Corpus",
    "DataError",
    "Example",
    "RandomWindowBatcher",
    "SentencePieceVocab",
    "Task",
    "WordVocab",
    "XLBatcher",
    "bpe",
    "build_prompt",
    "default_cache_dir",
    "default_corpus",
    "default_corpus_path",
    "enwik8",
    "example_task_path",
    "load",
    "load_tasks",
    "load_tokenizer",
    "read_text",
    "save_tokenizer",
    "text",
    "wikitext",
    "wikitext_sp",
]
