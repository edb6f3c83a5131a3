"""`moe-train prime`: zero/few-shot multiple choice by the likelihood of each choice.

Text is encoded with the tokenizer saved with the run (or export); the result is printed as JSON
and written into the run folder as `prime-TASK-kK.json` (or `--out`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moe_train.commands.common import add_plugin_flag, add_vocab_data_flag
from moe_train.config import non_negative_int, seed_int
from moe_train.errors import CLIError

NAME = "prime"
HELP = "zero/few-shot multiple choice"


def add_task_arguments(p) -> None:
    p.add_argument("checkpoint", help="a run directory, a checkpoint file or an export folder")
    p.add_argument("--task", required=True, help="task JSONL file")
    add_vocab_data_flag(p)
    p.add_argument("--k-shot", type=non_negative_int, default=0, help="demonstrations per prompt")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument(
        "--normalize",
        action="store_true",
        help="score choices by mean, not sum, log-likelihood",
    )
    p.add_argument(
        "--max-examples",
        type=non_negative_int,
        default=0,
        help="evaluate only the first N (0: all)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_plugin_flag(p, trust=True)


def add_arguments(p) -> None:
    add_task_arguments(p)
    p.add_argument("--out", help="JSON file for the result (default: RUN/prime-TASK-kK.json)")


def check_k_shot(k_shot: int, task) -> None:
    """The demonstrations of a prompt are the task's other examples: there must be enough."""
    if k_shot > len(task.examples) - 1:
        raise CLIError(
            f"--k-shot {k_shot} needs {k_shot} other examples per prompt; task {task.name} has "
            f"{len(task.examples)} example(s)"
        )


def scoring_options(args, loaded) -> dict:
    return dict(
        k_shot=args.k_shot,
        seed=args.seed,
        max_len=loaded.config.seq_len,
        device=loaded.device,
        normalize=args.normalize,
        max_examples=args.max_examples,
    )


def load(args):
    from moe_train import loading

    return loading.load(
        args.checkpoint,
        device=args.device,
        plugins=args.plugin,
        trust_plugins=args.trust_plugins,
        data=args.data,
    )


def result_name(task_name: str, args) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task_name)
    return f"prime-{safe}-k{args.k_shot}{'-normalized' if args.normalize else ''}.json"


def run(args) -> int:
    from moe_train.priming import accuracy, load_task

    loaded = load(args)
    task = load_task(args.task)
    check_k_shot(args.k_shot, task)
    result = accuracy(
        loaded.model,
        loaded.vocab,
        task,
        **scoring_options(args, loaded),
        progress=not args.no_progress,
    )
    print(json.dumps(result), flush=True)
    out = Path(args.out) if args.out else loaded.folder / result_name(task.name, args)
    record = {
        **result,
        "checkpoint": str(loaded.source),
        "step": loaded.step,
        "task_file": str(Path(args.task).resolve()),
        "seed": args.seed,
        "normalize": args.normalize,
        "max_examples": args.max_examples,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"result written to {out}", file=sys.stderr)
    return 0
