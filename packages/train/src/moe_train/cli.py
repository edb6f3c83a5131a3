"""`moe-train`: train, evaluate, prime and fine-tune the MoE language models of moe-models.

Every user mistake (unknown preset, option or override; missing or corrupt data; unreadable or
incompatible checkpoint; absent device) ends as one `error: ...` line on stderr and exit code 2.
Set MOE_TRAIN_DEBUG=1 to get the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import moe_data
import moe_models
import torch

from moe_train import checkpoint as ckpt
from moe_train.config import (
    DEFAULT_PRESET,
    RunConfig,
    TrainConfig,
    apply_train_overrides,
    resolve,
    split_overrides,
)
from moe_train.errors import CLIError

EXIT_USAGE = 2

TRAIN_EPILOG = f"""\
configuration, later wins:
  1. --preset NAME (default {DEFAULT_PRESET}) and the training defaults;
  2. --config FILE (JSON or TOML) with optional keys preset, data and tables model, train
     (a run's DIR/config.json has this shape);
  3. the flags above (--max-steps, --lr, ...);
  4. KEY=VALUE overrides: a bare KEY or model.KEY sets a model field (d_model=64, n_experts=4,
     ffn=dense), train.KEY sets a training field (train.lr=3e-4, train.schedule=linear).
training fields: {", ".join(f.name for f in TrainConfig.__dataclass_fields__.values())}

writes DIR/config.json, DIR/metrics.jsonl, DIR/tb/ (TensorBoard) and DIR/checkpoints/
(the last train.keep_last step-N.pt and best.pt). --resume continues DIR's latest checkpoint
exactly; only training fields (e.g. --max-steps) may change on resume.
distributed: torchrun --nproc_per_node N -m moe_train.cli train ... (gloo on CPU, nccl on CUDA;
DDP, train.batch_size is the global batch; --expert-parallel also shards the experts over the
ranks, checkpoints stay unsharded).
"""


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line, like every other error here."""

    def error(self, message: str):
        raise CLIError(message)


def _flag_fields(args) -> dict:
    return {
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "grad_accum": args.grad_accum,
        "precision": args.precision,
        "device": args.device,
        "seed": args.seed,
        "eval_interval": args.eval_interval,
        "log_interval": args.log_interval,
        "expert_parallel": args.expert_parallel,
    }


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", help=f"model preset (default {DEFAULT_PRESET}); see `moe-train info --list`"
    )
    p.add_argument("--config", help="JSON or TOML run config file")
    p.add_argument(
        "--data",
        help="KIND:PATH (wikitext:, enwik8:, text:, bytes:, bpe:); default: built-in corpus",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        help="optimiser steps (= train.max_steps, also the schedule length)",
    )
    p.add_argument("--batch-size", type=int, help="global batch (= train.batch_size)")
    p.add_argument("--seq-len", type=int, help="segment length (= the model field seq_len)")
    p.add_argument("--lr", type=float, help="peak learning rate (= train.lr)")
    p.add_argument("--warmup-steps", type=int, help="= train.warmup_steps")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step (= train.grad_accum)")
    p.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], help="= train.precision (fp16: CUDA only)"
    )
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (= train.device)")
    p.add_argument("--seed", type=int, help="= train.seed")
    p.add_argument("--eval-interval", type=int, help="= train.eval_interval")
    p.add_argument("--log-interval", type=int, help="= train.log_interval")
    p.add_argument(
        "--expert-parallel",
        action="store_const",
        const=True,
        help="shard the experts over the torchrun ranks (= train.expert_parallel=true)",
    )


def build_parser() -> tuple[Parser, dict[str, Parser]]:
    """The top-level parser (for --help) and one parser per subcommand."""
    parser = Parser(prog="moe-train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser(
        "train",
        help="train a model",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a language model; with no arguments, the tiny σ-MoE on the built-in corpus.",
    )
    _add_train_flags(t)
    t.add_argument("--out", help="run directory (default runs/<preset>-<timestamp>)")
    t.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    t.add_argument(
        "--stop-at", type=int, help="stop (and checkpoint) after this step, as if interrupted"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (see below)")

    e = sub.add_parser("eval", help="evaluate a checkpoint on valid and test")
    e.add_argument(
        "checkpoint", help="a checkpoint file or a run directory (its latest checkpoint)"
    )
    e.add_argument("--data", help="data spec (default: the one the checkpoint was trained on)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument(
        "--max-batches", type=int, default=0, help="evaluate only N batches per split (0: all)"
    )
    e.add_argument("--seq-len", type=int, help="segment length (default: the training one)")
    e.add_argument("--device", default="auto")
    e.add_argument("--out", help="JSON file for the metrics (default: next to the checkpoint)")

    for name, helptext in (
        ("prime", "zero/few-shot multiple choice"),
        ("finetune", "fine-tune on a task"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("checkpoint", help="a checkpoint file or a run directory")
        p.add_argument("--task", required=True, help="task JSONL file")
        p.add_argument("--data", help="data spec for the vocabulary (default: the checkpoint's)")
        p.add_argument("--k-shot", type=int, default=0, help="demonstrations per prompt")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--normalize",
            action="store_true",
            help="score choices by mean, not sum, log-likelihood",
        )
        p.add_argument(
            "--max-examples", type=int, default=0, help="evaluate only the first N (0: all)"
        )
        p.add_argument("--device", default="auto")
        if name == "finetune":
            p.add_argument("--eval-task", help="task JSONL to report accuracy on (default: --task)")
            p.add_argument("--max-steps", type=int, default=100)
            p.add_argument("--batch-size", type=int, default=8)
            p.add_argument("--lr", type=float, default=1e-4)
            p.add_argument("--out", help="run directory for the fine-tuned checkpoint")

    i = sub.add_parser("info", help="a preset's resolved config, parameter counts and FLOPs")
    i.add_argument("--preset", help=f"default {DEFAULT_PRESET}")
    i.add_argument("--config", help="JSON or TOML run config file")
    i.add_argument("--list", action="store_true", help="list the presets")
    i.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return parser, dict(sub.choices)


def _resume_config(args, out_dir: Path) -> RunConfig:
    """The checkpoint's own config; only training fields may be changed for the continuation."""
    latest = ckpt.latest(out_dir)
    if latest is None:
        raise CLIError(f"--resume: no checkpoint in {out_dir / 'checkpoints'} to resume from")
    payload = ckpt.load(latest)
    saved = RunConfig.from_dict(payload["run_config"])
    if args.preset and args.preset != saved.preset:
        try:
            wanted = moe_models.get_config(args.preset).arch
        except ValueError as e:
            raise CLIError(str(e)) from None
        raise CLIError(
            f"checkpoint {latest} is a {saved.model.arch} model ({saved.preset}); "
            f"cannot resume it as {args.preset} ({wanted})"
        )
    model_over, train_over = split_overrides(args.overrides)
    if model_over or args.config or args.seq_len is not None:
        raise CLIError("--resume keeps the checkpoint's model; drop the model overrides/--config")
    if args.data is not None and args.data != saved.data:
        saved.data = args.data
    flags = {k: v for k, v in _flag_fields(args).items() if v is not None}
    saved.train = apply_train_overrides(saved.train, flags, source="flags")
    saved.train = apply_train_overrides(saved.train, train_over, source="the command line")
    saved.train.validate()
    return saved


def cmd_train(args) -> int:
    from moe_train.distributed import teardown
    from moe_train.trainer import TrainOptions, train

    if args.resume:
        if not args.out:
            raise CLIError("--resume needs --out DIR (the run to continue)")
        cfg = _resume_config(args, Path(args.out))
    else:
        cfg = resolve(
            preset=args.preset,
            config_file=args.config,
            data=args.data,
            flags=_flag_fields(args),
            overrides=args.overrides,
        )
    if args.stop_at is not None and args.stop_at <= 0:
        raise CLIError(f"--stop-at must be positive, got {args.stop_at}")
    opts = TrainOptions(
        out_dir=Path(args.out) if args.out else None,
        resume=args.resume,
        stop_at=args.stop_at,
        progress=not args.no_progress,
        tensorboard=not args.no_tensorboard,
    )
    try:
        result = train(cfg, opts)
    finally:
        teardown()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.interrupted or result.step < cfg.train.max_steps:
        print(
            f"stopped at step {result.step}; continue with: moe-train train --out {result.out_dir} --resume"
        )
        return 0
    from moe_train.metrics import level_metrics

    m = level_metrics("valid", result.valid_loss, result.level)
    shown = f"bpc {m['valid_bpc']:.4f}" if "valid_bpc" in m else f"perplexity {m['valid_ppl']:.2f}"
    print(f"step {result.step}: validation {shown} (loss {result.valid_loss:.4f} nats/token)")
    print(f"run saved in {result.out_dir}")
    return 0


def _load_for_inference(path: str, data: str | None, device_name: str):
    """(payload, RunConfig, corpus, model on device, device) of a checkpoint, all validated."""
    from moe_train.data import load_corpus
    from moe_train.distributed import pick_device
    from moe_train.trainer import load_model_state

    device = pick_device(device_name)
    payload = ckpt.load(path)
    cfg = RunConfig.from_dict(payload["run_config"])
    corpus = load_corpus(data if data is not None else cfg.data)
    if corpus.vocab_size != cfg.model.vocab_size:
        raise CLIError(
            f"checkpoint {payload['path']} has a vocabulary of {cfg.model.vocab_size}, "
            f"the data {corpus.name} one of {corpus.vocab_size}"
        )
    model = moe_models.build(cfg.model)
    load_model_state(model, payload)
    return payload, cfg, corpus, model.to(device), device


def cmd_eval(args) -> int:
    from moe_train.distributed import DistEnv
    from moe_train.evaluate import evaluate
    from moe_train.metrics import level_metrics

    payload, cfg, corpus, model, device = _load_for_inference(
        args.checkpoint, args.data, args.device
    )
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    seq_len = args.seq_len or cfg.model.seq_len
    record = {"checkpoint": payload["path"], "step": payload["step"], "data": corpus.name}
    for split in ("valid", "test"):
        try:
            loss = evaluate(
                model,
                getattr(corpus, split),
                arch=model.arch,
                batch_size=args.batch_size,
                seq_len=seq_len,
                env=env,
                max_batches=args.max_batches,
            )
        except ValueError as e:
            raise CLIError(f"{split} split: {e}") from None
        record.update(level_metrics(split, loss, corpus.level))
        unit = "bpc" if f"{split}_bpc" in record else "ppl"
        print(f"{split}: loss {loss:.4f}  {unit} {record[f'{split}_{unit}']:.4f}")
    ckpt_path = Path(payload["path"])
    out = Path(args.out) if args.out else ckpt_path.parent / f"eval-{ckpt_path.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"metrics written to {out}")
    return 0


def cmd_prime(args) -> int:
    from moe_train.priming import accuracy, load_task

    _, cfg, corpus, model, device = _load_for_inference(args.checkpoint, args.data, args.device)
    task = load_task(args.task)
    result = accuracy(
        model,
        corpus,
        task,
        k_shot=args.k_shot,
        seed=args.seed,
        max_len=cfg.model.seq_len,
        device=device,
        normalize=args.normalize,
        max_examples=args.max_examples,
    )
    print(json.dumps(result))
    return 0


def cmd_finetune(args) -> int:
    from moe_train.priming import accuracy, finetune, load_task

    payload, cfg, corpus, model, device = _load_for_inference(
        args.checkpoint, args.data, args.device
    )
    task = load_task(args.task)
    eval_task = load_task(args.eval_task) if args.eval_task else task
    common = dict(
        k_shot=args.k_shot,
        seed=args.seed,
        max_len=cfg.model.seq_len,
        device=device,
        normalize=args.normalize,
        max_examples=args.max_examples,
    )
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


def cmd_info(args) -> int:
    if args.list:
        print("\n".join(moe_models.presets()))
        return 0
    cfg = resolve(preset=args.preset, config_file=args.config, overrides=args.overrides)
    counts = moe_models.count_parameters(cfg.model)
    info = {
        **cfg.to_dict(),
        "parameters": counts,
        "flops_per_token": moe_models.flops_per_token(cfg.model),
    }
    print(json.dumps(info, indent=2))
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "prime": cmd_prime,
    "finetune": cmd_finetune,
    "info": cmd_info,
}


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        top, commands = build_parser()
        if not argv or argv[0] not in commands:
            top.parse_args(argv)
            raise CLIError(f"unknown command {argv[0]!r}; expected one of {', '.join(commands)}")
        # intermixed: KEY=VALUE overrides may come before, between or after the flags
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return COMMANDS[args.command](args)
    except CLIError as e:
        if os.environ.get("MOE_TRAIN_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (moe_data.DataError, ValueError, torch.cuda.OutOfMemoryError) as e:
        if os.environ.get("MOE_TRAIN_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
