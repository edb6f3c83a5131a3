"""`moe-train finetune`: fine-tune on a task's examples, accuracy before and after."""

from __future__ import annotations

import json
from pathlib import Path

from moe_train import checkpoint as ckpt
from moe_train.commands.common import load_for_inference
from moe_train.commands.prime import add_task_arguments, check_k_shot, scoring_options
from moe_train.config import positive_float, positive_int

NAME = "finetune"
HELP = "fine-tune on a task"


def add_arguments(p) -> None:
    add_task_arguments(p)
    p.add_argument("--eval-task", help="task JSONL to report accuracy on (default: --task)")
    p.add_argument("--max-steps", type=positive_int, default=100)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--out", help="run directory for the fine-tuned checkpoint")


def run(args) -> int:
    from moe_train.priming import accuracy, finetune, load_task

    payload, cfg, corpus, model, device = load_for_inference(
        args, args.checkpoint, args.data, args.device
    )
    task = load_task(args.task)
    eval_task = load_task(args.eval_task) if args.eval_task else task
    check_k_shot(args.k_shot, eval_task)
    common = scoring_options(args, cfg, device)
    before = accuracy(model, corpus, eval_task, **common)
    losses = finetune(
        model,
        corpus,
        task,
        steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        max_len=cfg.model.seq_len,
        seed=args.seed,
        device=device,
    )
    after = accuracy(model, corpus, eval_task, **common)
    result = {
        "task": task.name,
        "eval_task": eval_task.name,
        "steps": args.max_steps,
        "accuracy_before": before["accuracy"],
        "accuracy": after["accuracy"],
        "n": after["n"],
        "final_loss": losses[-1] if losses else None,
    }
    if args.out:
        out = Path(args.out)
        step = int(payload["step"]) + args.max_steps
        # a model checkpoint without training state: eval/prime read it, --resume refuses it
        kept = {k: payload[k] for k in ("run_config", "arch", "level") if k in payload}
        ckpt.CheckpointManager(out / "checkpoints", keep_last=1).save(
            {**kept, "model": model.state_dict(), "step": step, "finetune": result}, step=step
        )
        (out / "finetune.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0
