"""moe-data: corpora, tokenizers, LM batching and priming tasks for MoE language models.

Corpora: `wikitext(folder)`, `enwik8(path)`, `text(path, level)`, `bpe(path, tokenizer)`,
`default_corpus(level)` and `load(spec)` for the CLI's `--data` strings; each returns a `Corpus`.
Batching: `XLBatcher` (Transformer-XL streams) and `RandomWindowBatcher` (decoder LMs).
Priming: `load_tasks`, `build_prompt`, `example_task_path`. No torch here: batches are numpy.
"""

from moe_data.batching import RandomWindowBatcher, XLBatcher
from moe_data.cache import default_cache_dir
from moe_data.corpus import LEVELS, Corpus
from moe_data.datasets import bpe, default_corpus, default_corpus_path, enwik8, text, wikitext
from moe_data.errors import DataError
from moe_data.spec import load
from moe_data.tasks import Example, Task, build_prompt, example_task_path, load_tasks
from moe_data.vocab import BPEVocab, ByteVocab, CharVocab, WordVocab

__all__ = [
    "LEVELS",
    "BPEVocab",
    "ByteVocab",
    "CharVocab",
    "Corpus",
    "DataError",
    "Example",
    "RandomWindowBatcher",
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
    "text",
    "wikitext",
]
