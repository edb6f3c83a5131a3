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


# --bench's own options: flag, default, help
BENCH_OPTIONS = (
    ("--batch-size", 1, "prompts decoded at once"),
    ("--prompt-len", 32, "tokens of each random prompt"),
    ("--repeats", 5, "timed repeats, medians reported"),
    ("--threads", "torch's", "torch threads"),
)


def add_arguments(p) -> None:
    p.add_argument(
        "checkpoint",
        nargs="?",
        help="a run directory, a checkpoint file or an export folder (--bench: or --preset)",
    )
    p.add_argument("--prompt", help="the text to continue (required unless --bench)")
    p.add_argument(
        "--max-new-tokens",
        type=non_negative_int,
        help="how many tokens to generate after the prompt (default 100; with --bench 32)",
    )
    p.add_argument(
        "--temperature",
        type=positive_float,
        default=1.0,
        help="divides the logits before sampling: below 1 sharper, above 1 more random "
        "(default 1.0; ignored with --greedy)",
    )
    p.add_argument("--top-k", type=positive_int, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=top_p_type, help="sample from the smallest set of mass >= p")
    p.add_argument("--greedy", action="store_true", help="always take the likeliest token")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the sampling")
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N or auto (default: CUDA when available, else the CPU)",
    )
    add_plugin_flag(p, trust=True)
    bench = p.add_argument_group(
        "--bench",
        "time prefill and greedy decoding on random prompts instead of writing text: tokens/s, "
        "the decode step against the memory-bandwidth bound (the time to read the active "
        "weights once, measured)",
    )
    bench.add_argument("--bench", action="store_true", help="measure instead of generating")
    bench.add_argument("--preset", help="time a preset's randomly initialised model (no run)")
    for flag, default, helptext in BENCH_OPTIONS:
        bench.add_argument(flag, type=positive_int, help=f"{helptext} (default {default})")


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
    if args.bench:
        return bench(args)
    for flag in ("--preset", *(option[0] for option in BENCH_OPTIONS)):
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            raise CLIError(f"{flag} is an option of --bench; pass --bench or drop it")
    if args.checkpoint is None:
        raise CLIError("give a run directory, checkpoint file or export folder to generate from")
    if args.prompt is None:
        raise CLIError("--prompt is required (the text to continue)")
    return write(args)


def write(args) -> int:
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
        100 if args.max_new_tokens is None else args.max_new_tokens,
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


def bench(args) -> int:
    import moe_models
    import torch

    from moe_train.generation_speed import measure

    if (args.checkpoint is None) == (args.preset is None):
        raise CLIError("--bench times a run/export or a --preset: give one of them")
    batch, prompt_len, repeats = args.batch_size or 1, args.prompt_len or 32, args.repeats or 5
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.preset is not None:
        from moe_train.config import resolve
        from moe_train.distributed import pick_device

        cfg = resolve(plugins=args.plugin, preset=args.preset).model
        torch.manual_seed(args.seed)
        model = moe_models.build(cfg).to(pick_device(args.device))
        what = f"{args.preset} (random weights)"
    else:
        from moe_train import loading

        loaded = loading.load(
            args.checkpoint,
            device=args.device,
            plugins=args.plugin,
            trust_plugins=args.trust_plugins,
        )
        model, what = loaded.model, str(loaded.source)
    new = 32 if args.max_new_tokens is None else args.max_new_tokens
    if new < 1:
        raise CLIError("--bench needs --max-new-tokens >= 1")
    param = next(model.parameters())
    speed = measure(
        {what: model},
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new,
        repeats=repeats,
        seed=args.seed,
    )[what]
    counts = moe_models.count_parameters(model.config)
    print(
        f"{what}: batch {batch}, {prompt_len}-token prompts, {new} new tokens, greedy, "
        f"{param.device}, {torch.get_num_threads()} thread(s), medians of {repeats}"
    )
    print(f"prefill   {speed.prefill_tokens_per_s:10.1f} tokens/s")
    print(
        f"decode    {speed.decode_tokens_per_s:10.1f} tokens/s "
        f"({speed.decode_step_s * 1e3:.2f} ms a step)"
    )
    print(
        f"bound     {batch / speed.floor_s:10.1f} tokens/s at batch "
        f"{batch} ({speed.floor_s * 1e3:.2f} ms a step): {counts['active']:,} active "
        f"parameters, {speed.weight_bytes / 2**20:.1f} MiB of {str(param.dtype).split('.')[-1]} "
        f"read per step at a measured {speed.bandwidth_bytes_per_s / 1e9:.2f} GB/s"
    )
    print(f"decode step / bound  {speed.step_over_floor:.2f}x")
    return 0
