"""`moe-train prime`: zero/few-shot multiple choice by the likelihood of each choice."""

from __future__ import annotations

import json

from moe_train.commands.common import add_plugin_flag, load_for_inference
from moe_train.config import non_negative_int
from moe_train.errors import CLIError

NAME = "prime"
HELP = "zero/few-shot multiple choice"


def add_task_arguments(p) -> None:
    p.add_argument("checkpoint", help="a checkpoint file or a run directory")
    p.add_argument("--task", required=True, help="task JSONL file")
    p.add_argument("--data", help="data spec for the vocabulary (default: the checkpoint's)")
    p.add_argument("--k-shot", type=non_negative_int, default=0, help="demonstrations per prompt")
    p.add_argument("--seed", type=non_negative_int, default=0)
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
    add_plugin_flag(p)


def add_arguments(p) -> None:
    add_task_arguments(p)


def check_k_shot(k_shot: int, task) -> None:
    """The demonstrations of a prompt are the task's other examples: there must be enough."""
    if k_shot > len(task.examples) - 1:
        raise CLIError(
            f"--k-shot {k_shot} needs {k_shot} other examples per prompt; task {task.name} has "
            f"{len(task.examples)} example(s)"
        )


def scoring_options(args, cfg, device) -> dict:
    return dict(
        k_shot=args.k_shot,
        seed=args.seed,
        max_len=cfg.model.seq_len,
        device=device,
        normalize=args.normalize,
        max_examples=args.max_examples,
    )


def run(args) -> int:
    from moe_train.priming import accuracy, load_task

    _, cfg, corpus, model, device = load_for_inference(
        args, args.checkpoint, args.data, args.device
    )
    task = load_task(args.task)
    check_k_shot(args.k_shot, task)
    result = accuracy(model, corpus, task, **scoring_options(args, cfg, device))
    print(json.dumps(result))
    return 0
