"""`moe-train finetune`: fine-tune on a task's examples, accuracy before and after.

Writes a run folder (`--out`, default runs/finetune-TASK-STAMP): config.json (the model's run
config), tokenizer.json, metrics.jsonl (one record per step, its loss), finetune.json (options and
result) and a model checkpoint that eval/prime/export read (it has no training state, so
`train --resume` refuses it).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

from moe_train.commands.prime import add_task_arguments, check_k_shot, load, scoring_options
from moe_train.config import positive_float, positive_int
from moe_train.errors import CLIError

NAME = "finetune"
HELP = "fine-tune on a task"


def add_arguments(p) -> None:
    add_task_arguments(p)
    p.add_argument("--eval-task", help="task JSONL to report accuracy on (default: --task)")
    p.add_argument("--max-steps", type=positive_int, default=100)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument(
        "--out", help="run directory for the fine-tuned model (default: runs/finetune-TASK-STAMP)"
    )


def _out_dir(args, task):
    """(the output folder, its lock, held): two commands never write one folder at once."""
    from moe_train import rundir

    if args.out:
        out = Path(args.out)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"finetune-{task.name}-{stamp}"
    rundir.prepare(out)
    lock = rundir.RunLock(out)
    note = lock.acquire()
    if note:
        print(note, file=sys.stderr)
    found = rundir.history(out)
    if found:
        lock.release()
        raise CLIError(f"--out {out} already holds a run ({', '.join(found)}); choose another")
    return out, lock


def _run_config(loaded):
    from moe_train.config import RunConfig

    if loaded.run_config is not None:
        return loaded.run_config
    return RunConfig(preset="export", data=loaded.data, model=loaded.config, plugins=loaded.plugins)


def run(args) -> int:
    from moe_train.priming import load_task

    loaded = load(args)
    task = load_task(args.task)
    eval_task = load_task(args.eval_task) if args.eval_task else task
    check_k_shot(args.k_shot, eval_task)
    out, lock = _out_dir(args, task)
    try:
        return _finetune(args, loaded, task, eval_task, out)
    finally:
        lock.release()


def _finetune(args, loaded, task, eval_task, out: Path) -> int:
    import moe_data

    from moe_train import checkpoint as ckpt
    from moe_train.metrics import MetricsLogger, level_metrics
    from moe_train.priming import accuracy, finetune

    run_config = _run_config(loaded).to_dict()
    (out / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    moe_data.save_tokenizer(loaded.vocab, out / "tokenizer.json")
    common = scoring_options(args, loaded)
    progress = not args.no_progress
    model, vocab = loaded.model, loaded.vocab
    before = accuracy(model, vocab, eval_task, **common, progress=progress)
    start = loaded.step or 0
    logger = MetricsLogger(out, tensorboard=False)
    try:
        losses = finetune(
            model,
            vocab,
            task,
            steps=args.max_steps,
            batch_size=args.batch_size,
            lr=args.lr,
            max_len=loaded.config.seq_len,
            seed=args.seed,
            device=loaded.device,
            progress=progress,
            on_step=lambda step, loss: logger.log(
                {"step": start + step, **level_metrics("train", loss, vocab.level), "lr": args.lr}
            ),
        )
        after = accuracy(model, vocab, eval_task, **common, progress=progress)
        step = start + args.max_steps
        result = {
            "task": task.name,
            "eval_task": eval_task.name,
            "steps": args.max_steps,
            "accuracy_before": before["accuracy"],
            "accuracy": after["accuracy"],
            "n": after["n"],
            "final_loss": losses[-1] if losses else None,
        }
        logger.log({"step": step, "accuracy_before": before["accuracy"], **after})
    finally:
        logger.close()
    options = {
        "source": str(loaded.source),
        "task_file": str(Path(args.task).resolve()),
        "eval_task_file": str(Path(args.eval_task or args.task).resolve()),
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "k_shot": args.k_shot,
        "normalize": args.normalize,
    }
    # a model checkpoint without training state: eval/prime read it, --resume refuses it
    kept = {"run_config": run_config, "arch": loaded.config.arch, "level": vocab.level}
    ckpt.CheckpointManager(out / "checkpoints", keep_last=1).save(
        {**kept, "model": model.state_dict(), "step": step, "finetune": result}, step=step
    )
    (out / "finetune.json").write_text(json.dumps({**result, "options": options}, indent=2) + "\n")
    print(json.dumps(result))
    print(f"fine-tuned model written to {out}", file=sys.stderr)
    return 0
