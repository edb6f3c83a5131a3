"""`moe-train eval`: valid and test loss of a checkpoint (bpc for char/byte data, else ppl).

The data is the corpus the run trained on (or `--data`), checked against the tokenizer that
travels with the run; `--text FILE` evaluates a text file encoded with that tokenizer instead,
so a run can be evaluated after its corpus is gone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from moe_train.commands.common import add_plugin_flag
from moe_train.config import non_negative_int, positive_int
from moe_train.errors import CLIError

NAME = "eval"
HELP = "evaluate a checkpoint on valid and test"
# --text is read, encoded and evaluated in memory (8 bytes per token id): a bound, so that a
# huge file is one error rather than a MemoryError after minutes
TEXT_MAX_BYTES = 256 * 2**20


def add_arguments(p) -> None:
    p.add_argument(
        "checkpoint",
        help="a run directory (its latest checkpoint), a checkpoint file or an export folder",
    )
    p.add_argument("--data", help="data spec (default: the one the checkpoint was trained on)")
    p.add_argument(
        "--text",
        metavar="FILE",
        help="evaluate this UTF-8 text file (a regular file of at most 256 MiB), encoded with "
        "the run's tokenizer, instead of the data's valid and test splits",
    )
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument(
        "--max-batches",
        type=non_negative_int,
        default=0,
        help="evaluate only N batches per split (0: all)",
    )
    p.add_argument(
        "--seq-len", type=positive_int, help="segment length (default: the training one)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="JSON file for the metrics (default: next to the checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_plugin_flag(p, trust=True)


def _splits(args, loaded) -> tuple[str, str, dict]:
    """(data name, level, {split name: token ids})."""
    import moe_data
    import numpy as np

    from moe_train.data import load_corpus
    from moe_train.loading import encode, same_vocabulary

    if args.text is not None:
        if args.data is not None:
            raise CLIError("--text and --data exclude each other: give one")
        if loaded.vocab is None:
            raise CLIError(f"--text needs the tokenizer of the model; {loaded.folder} has none")
        path = Path(args.text)
        text = moe_data.read_text(path, "--text file", max_bytes=TEXT_MAX_BYTES)
        ids = np.asarray(encode(loaded.vocab, text), dtype=np.int64)
        return path.name, loaded.vocab.level, {"text": ids}
    spec = args.data if args.data is not None else loaded.data
    try:
        corpus = load_corpus(spec)
    except CLIError as e:
        if args.data is not None:
            raise
        # the run's own corpus moved or is gone: say what evaluates it instead
        raise CLIError(
            f"{e}; eval reads the valid and test splits of the data the run trained on "
            f"({spec}): pass --data SPEC where that data is now, or --text FILE to evaluate a "
            "text file with the run's tokenizer"
        ) from None
    if loaded.vocab is not None and not same_vocabulary(corpus.vocab, loaded.vocab):
        raise CLIError(
            f"the data {corpus.name} ({spec}) is tokenised differently from the model's "
            f"tokenizer ({loaded.folder / 'tokenizer.json'}); pass --text FILE to evaluate text "
            "with the model's own tokenizer"
        )
    if corpus.vocab_size != loaded.config.vocab_size:
        raise CLIError(
            f"{loaded.source} has a vocabulary of {loaded.config.vocab_size}, the data "
            f"{corpus.name} one of {corpus.vocab_size}"
        )
    return corpus.name, corpus.level, {"valid": corpus.valid, "test": corpus.test}


def _writable(out: Path) -> Path:
    """`out`, checked before anything is computed: a read-only run folder is one error at once,
    not after the whole evaluation."""
    folder = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    target = out if out.exists() else folder
    if not folder.is_dir() or not os.access(target, os.W_OK):
        raise CLIError(
            f"cannot write the metrics to {out} ({target} is not writable); "
            "pass --out FILE to write them elsewhere"
        )
    return out


def _out_path(args) -> Path | None:
    return _writable(Path(args.out)) if args.out else None


def run(args) -> int:
    from moe_train import loading
    from moe_train.distributed import DistEnv
    from moe_train.evaluate import evaluate
    from moe_train.metrics import level_metrics

    out = _out_path(args)
    loaded = loading.load(
        args.checkpoint,
        device=args.device,
        plugins=args.plugin,
        trust_plugins=args.trust_plugins,
        tokenizer=False,
    )
    if out is None:
        where = loaded.source.parent if loaded.payload is not None else loaded.folder
        suffix = f"-{Path(args.text).stem}" if args.text is not None else ""
        out = _writable(where / f"eval-{loaded.name}{suffix}.json")
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=loaded.device)
    seq_len = args.seq_len or loaded.config.seq_len
    name, level, splits = _splits(args, loaded)
    record = {"checkpoint": str(loaded.source), "step": loaded.step, "data": name}
    for split, tokens in splits.items():
        try:
            loss = evaluate(
                loaded.model,
                tokens,
                batch_size=args.batch_size,
                seq_len=seq_len,
                env=env,
                max_batches=args.max_batches,
                progress=None if args.no_progress else split,
            )
        except ValueError as e:
            raise CLIError(f"{split} split: {e}") from None
        record.update(level_metrics(split, loss, level))
        unit = "bpc" if f"{split}_bpc" in record else "ppl"
        print(f"{split}: loss {loss:.4f}  {unit} {record[f'{split}_{unit}']:.4f}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"metrics written to {out}")
    return 0
