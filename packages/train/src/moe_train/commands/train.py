"""`moe-train train`: train a model (the tiny σ-MoE on the built-in corpus by default)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moe_train import rundir
from moe_train.commands.common import add_plugin_flag, plugins
from moe_train.config import (
    DEFAULT_PRESET,
    RunConfig,
    TrainConfig,
    apply_train_overrides,
    positive_int,
    resolve,
    split_overrides,
)
from moe_train.errors import CLIError

NAME = "train"
HELP = "train a model"
EPILOG = f"""\
configuration, later wins:
  1. --preset NAME (default {DEFAULT_PRESET}) and the training defaults;
  2. --config FILE (JSON or TOML) with optional keys preset, data, plugins and tables model,
     train (a run's DIR/config.json has this shape);
  3. the flags above (--max-steps, --lr, ...);
  4. KEY=VALUE overrides: a bare KEY or model.KEY sets a model field (d_model=64, n_experts=4,
     ffn=dense), ffn.KEY an option of the FFN layer, train.KEY a training field (train.lr=3e-4,
     train.schedule=linear).
training fields: {", ".join(f.name for f in TrainConfig.__dataclass_fields__.values())}

writes DIR/config.json, DIR/metrics.jsonl, DIR/tb/ (TensorBoard) and DIR/checkpoints/
(the last train.keep_last folders step-N/ and best/); DIR/.lock keeps a second run out while it runs.
A fresh run into a DIR holding another run's history is refused: --resume continues DIR's newest
checkpoint that loads, exactly (only training fields, e.g. --max-steps, may change on resume);
--overwrite deletes that history first.
before building the model the run's memory is estimated (weights, gradients, AdamW moments,
activations) and refused when the device cannot hold it; train.skip_memory_check=true skips that.
exit codes: 0 done (or stopped, resumable), 2 a user error (one `error:` line), 1 a bug.
layers of your own: --plugin FILE.py (or a module) that calls moe_models.register_ffn(NAME, Config),
then ffn=NAME; the run records the plugin, which --resume and eval import again only when it
is named again (--plugin; eval also takes --trust-plugins).
distributed: torchrun --nproc_per_node N -m moe_train.cli train ... (gloo on CPU, nccl on CUDA;
FSDP2 over train.dp_shard ranks, HSDP with train.dp_replicate, experts sharded over train.ep of
the dp_shard ranks; train.batch_size is the global batch; each rank writes its checkpoint shards,
which resume on any layout).
"""
PARSER = dict(
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    description="Train a language model; with no arguments, the tiny σ-MoE on the built-in corpus.",
)

# flag -> TrainConfig field (None: a model field, set like KEY=VALUE)
TRAIN_FLAGS = {
    "max_steps": "train.max_steps, also the schedule length",
    "batch_size": "the global batch (= train.batch_size)",
    "lr": "peak learning rate (= train.lr)",
    "warmup_steps": "= train.warmup_steps",
    "grad_accum": "micro-batches per step (= train.grad_accum)",
    "device": "auto, cpu, cuda or cuda:N (= train.device)",
    "seed": "= train.seed",
    "eval_interval": "= train.eval_interval",
    "log_interval": "= train.log_interval",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", help=f"model preset (default {DEFAULT_PRESET}); see `moe-train info --list`"
    )
    p.add_argument("--config", help="JSON or TOML run config file")
    p.add_argument(
        "--data",
        help="KIND:PATH (wikitext:, enwik8:, text:, bytes:, bpe:); default: built-in corpus",
    )
    add_plugin_flag(p)
    # ranges are checked with the rest of the config, by the field's name (train.max_steps)
    types = {"lr": float, "device": str}
    for name, helptext in TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=types.get(name, int), help=helptext)
    p.add_argument("--seq-len", type=int, help="segment length (= the model field seq_len)")
    p.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], help="= train.precision (fp16: CUDA only)"
    )
    p.add_argument(
        "--expert-parallel",
        action="store_const",
        const=True,
        help="shard the experts over all dp_shard ranks (= train.expert_parallel=true, train.ep=dp_shard)",
    )
    p.add_argument(
        "--compile",
        action="store_const",
        const=True,
        help="run the model through torch.compile (= train.compile=true)",
    )
    p.add_argument("--out", help="run directory (default runs/<preset>-<timestamp>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the newest checkpoint in --out that loads",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run history in --out (config.json, metrics.jsonl, checkpoints/, tb/) "
        "and start afresh",
    )
    p.add_argument(
        "--stop-at",
        type=positive_int,
        help="stop (and checkpoint) after this step, as if interrupted",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (see below)")


def flag_fields(args) -> dict:
    """The training fields the flags set (None: not given)."""
    fields = {name: getattr(args, name) for name in TRAIN_FLAGS}
    fields["precision"] = args.precision
    fields["expert_parallel"] = args.expert_parallel
    fields["compile"] = args.compile
    return fields


def model_flags(args) -> dict:
    return {"seq_len": args.seq_len}


def resume_config(args, out_dir: Path) -> RunConfig:
    """The checkpoint's own config; only training fields may be changed for the continuation."""
    import moe_models

    from moe_train import checkpoint as ckpt

    # the trainer loads it again and says which newer files it skipped
    payload = ckpt.load_newest(out_dir, tensors=False)
    if payload is None:
        raise CLIError(f"--resume: no checkpoint in {out_dir / 'checkpoints'} to resume from")
    latest = payload["path"]
    note = rundir.edited_config_note(out_dir, payload["run_config"])
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(note, file=sys.stderr)
    saved = RunConfig.from_dict(
        payload["run_config"], where=f"the run {out_dir}", offer_trust=False
    )
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
    flags = {k: v for k, v in flag_fields(args).items() if v is not None}
    saved.train = apply_train_overrides(saved.train, flags, source="flags")
    saved.train = apply_train_overrides(saved.train, train_over, source="the command line")
    saved.train.validate()
    from moe_train.parallelize import layout_for_resume

    # the layout follows this run's world size unless the user sets it
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    saved.train, note = layout_for_resume(saved.train, {*flags, *train_over}, world_size)
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(note, file=sys.stderr)
    return saved


def run(args) -> int:
    from moe_train.distributed import teardown
    from moe_train.metrics import validation_line
    from moe_train.trainer import TrainOptions, train

    plugins(args)
    if args.resume and args.overwrite:
        raise CLIError("--resume continues the run in --out, --overwrite deletes it: pass one")
    if args.resume:
        if not args.out:
            raise CLIError("--resume needs --out DIR (the run to continue)")
        cfg = resume_config(args, Path(args.out))
    else:
        cfg = resolve(
            plugins=args.plugin,
            preset=args.preset,
            config_file=args.config,
            data=args.data,
            flags=flag_fields(args),
            model_flags=model_flags(args),
            overrides=args.overrides,
        )
    opts = TrainOptions(
        out_dir=Path(args.out) if args.out else None,
        resume=args.resume,
        overwrite=args.overwrite,
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
            f"stopped at step {result.step}; continue with: "
            f"moe-train train --out {result.out_dir} --resume"
        )
        return 0
    print(validation_line(result.step, result.valid_loss, result.level))
    print(f"run saved in {result.out_dir}")
    return 0
