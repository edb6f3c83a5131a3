"""`moe-train generate`: continue a prompt, the text streamed to the terminal as it comes.

The prompt is encoded and the tokens decoded with the tokenizer saved with the run (or export).
Sampling is seeded (`--seed`), so the same command gives the same text.
"""

from __future__ import annotations

import math
import sys

from moe_train.commands.common import add_plugin_flag
from moe_train.config import (
    _argument_type,
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
)
from moe_train.errors import CLIError

NAME = "generate"
HELP = "continue a prompt (greedy or sampled), streaming the text"
REPLACEMENT = "\N{REPLACEMENT CHARACTER}"


top_p_type = _argument_type(
    "top_p", float, lambda v: math.isfinite(v) and 0.0 < v <= 1.0, "a number in (0, 1]"
)


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="a run directory, a checkpoint file or an export folder")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=100)
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--top-k", type=positive_int, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=top_p_type, help="sample from the smallest set of mass >= p")
    p.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the sampling")
    p.add_argument("--device", default="auto")
    add_plugin_flag(p, trust=True)


class IncrementalDecoder:
    """Decodes a growing list of ids and hands out the new text; a byte-level tokenizer's token
    may end inside a character, so text ending in U+FFFD is held back until it completes."""

    def __init__(self, vocab) -> None:
        self.vocab = vocab
        self.ids: list[int] = []
        self.shown = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.vocab.decode(self.ids)
        if text.endswith(REPLACEMENT):
            return ""
        return self._take(text)

    def flush(self) -> str:
        return self._take(self.vocab.decode(self.ids))

    def _take(self, text: str) -> str:
        # decoding the longer list may change earlier text (a word-level join): show what is new
        new, self.shown = text[self.shown :], len(text)
        return new


def run(args) -> int:
    import moe_models
    import torch

    from moe_train import loading

    loaded = loading.load(
        args.checkpoint, device=args.device, plugins=args.plugin, trust_plugins=args.trust_plugins
    )
    ids = loading.encode(loaded.vocab, args.prompt)
    if not ids:
        raise CLIError(f"--prompt {args.prompt!r} encodes to no token; give some text")
    prompt = torch.tensor([ids], dtype=torch.int64, device=loaded.device)
    generator = torch.Generator(device=loaded.device).manual_seed(args.seed)
    decoder = IncrementalDecoder(loaded.vocab)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    tokens = moe_models.stream(
        loaded.model,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
        generator=generator,
    )
    try:
        for token in tokens:
            out.write(decoder.add(int(token[0])))
            out.flush()
    except ValueError as e:
        # e.g. a decoder with learned positions asked for more than its seq_len
        raise CLIError(f"generation stopped: {str(e).splitlines()[0]}") from None
    out.write(decoder.flush() + "\n")
    out.flush()
    return 0
