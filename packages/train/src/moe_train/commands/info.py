"""`moe-train info`: a config's resolved form, parameter counts and FLOPs; `--list` the presets;
`--plan` the memory one rank needs to train it (moe_train.memory) on `--nproc` ranks of
`--gpu-mem` GiB each, part by part, and whether it fits."""

from __future__ import annotations

import json
import os
import sys

from moe_train.commands.common import add_plugin_flag
from moe_train.config import DEFAULT_PRESET, positive_float, positive_int, resolve
from moe_train.errors import CLIError

NAME = "info"
HELP = "a preset's resolved config, parameter counts and FLOPs"


def add_arguments(p) -> None:
    p.add_argument("--preset", help=f"default {DEFAULT_PRESET}")
    p.add_argument("--config", help="JSON or TOML run config file")
    p.add_argument(
        "--list", action="store_true", help="list the presets: name, parameters, description"
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="per-rank memory of training (weights, gradients, AdamW, FSDP copies, activations) "
        "and whether it fits --gpu-mem",
    )
    p.add_argument(
        "--nproc", type=positive_int, help="--plan: the number of ranks, nodes x GPUs (default 1)"
    )
    p.add_argument(
        "--gpu-mem", type=positive_float, metavar="GIB", help="--plan: GiB per GPU (default 80)"
    )
    add_plugin_flag(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="[PRESET] KEY=VALUE",
        help="the first may name the preset; then overrides as in train: a model field "
        "(d_model=256, ffn=dense), an FFN option (ffn.n_experts=32 or n_experts=32) or a "
        "training field (train.lr=3e-4)",
    )


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def run(args) -> int:
    import moe_models

    if args.list:
        rows = []
        for name in moe_models.presets():
            p = moe_models.preset_info(name)
            counts = moe_models.count_parameters(p.config)
            rows.append((name, _count(counts["total"]), _count(counts["active"]), p.description))
        width = max(len(r[0]) for r in rows)
        try:
            print(f"{'preset':<{width}}  {'params':>7}  {'active':>7}  description")
            for name, total, active, description in rows:
                print(f"{name:<{width}}  {total:>7}  {active:>7}  {description}")
            sys.stdout.flush()
        except BrokenPipeError:
            # the reader stopped early (`| head`): it has what it wanted, which is no error;
            # stdout goes to /dev/null so that the exit's flush does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    preset, overrides = _preset_and_overrides(args)
    if not args.plan and (args.nproc is not None or args.gpu_mem is not None):
        raise CLIError("--nproc and --gpu-mem go with --plan")
    cfg = resolve(plugins=args.plugin, preset=preset, config_file=args.config, overrides=overrides)
    if args.plan:
        print(plan_table(cfg, args.nproc or 1, args.gpu_mem or 80.0))
        return 0
    counts = moe_models.count_parameters(cfg.model)
    info = {
        **cfg.to_dict(),
        "parameters": counts,
        "flops_per_token": moe_models.flops_per_token(cfg.model),
    }
    print(json.dumps(info, indent=2))
    return 0


def _preset_and_overrides(args) -> tuple[str | None, list[str]]:
    """`info PRESET KEY=VALUE ...`: a first positional without `=` names the preset."""
    import moe_models

    items = list(args.overrides)
    if items and "=" not in items[0]:
        if items[0] not in moe_models.presets():
            raise CLIError(
                f"{items[0]!r} is neither a preset (moe-train info --list) nor a KEY=VALUE override"
            )
        if args.preset is not None and args.preset != items[0]:
            raise CLIError(f"two presets given: {items[0]!r} and --preset {args.preset!r}")
        return items[0], items[1:]
    return args.preset, items


def plan_table(cfg, nproc: int, gpu_mem: float) -> str:
    """The per-rank memory plan of training cfg on nproc ranks, as printed by `info --plan`."""
    from moe_train import memory

    train = cfg.train
    micro = train.batch_size / (nproc * train.grad_accum)
    if micro != int(micro):
        raise CLIError(
            f"train.batch_size={train.batch_size} is not divisible by --nproc {nproc} x "
            f"train.grad_accum {train.grad_accum}"
        )
    layout = memory.Layout.from_train(train, nproc)
    p = memory.plan(cfg.model, train, int(micro), layout)
    budget = gpu_mem * memory.GIB
    lo = memory.activation_bytes(train, layout) == 2
    rows = [
        ("weights (fp32 shards)", p.parameters),
        ("gradients (fp32 shards)", p.gradients),
        ("AdamW moments (fp32 shards)", p.optimizer),
        (f"FSDP gathered copies ({layout.param_dtype})", p.gathered),
        (f"activations ({'16' if lo else '32'}-bit)", p.activations),
        ("total", p.total),
        ("whole fp32 model, rank 0's host", p.host),
    ]
    width = max(len(name) for name, _ in rows)
    held = f"{p.held / 1e9:.3f}B of {p.parameters_total / 1e9:.3f}B parameters"
    lines = [
        f"{cfg.preset} on {nproc} rank{'s' if nproc > 1 else ''}: dp_replicate="
        f"{layout.dp_replicate} dp_shard={layout.dp_shard} ep={layout.ep}, "
        f"activation_checkpointing={layout.activation_checkpointing}, "
        f"reshard_after_forward={str(layout.reshard_after_forward).lower()}",
        f"micro-batch {p.micro_batch} x seq_len {cfg.model.seq_len}, {held} per rank",
        f"{'per rank':<{width}}  {'GiB':>7}",
        *(f"{name:<{width}}  {n / memory.GIB:7.2f}" for name, n in rows),
        f"{'fits' if p.peak <= budget else 'does not fit'} in {gpu_mem:g} GiB "
        f"(peak {p.peak / budget:.0%}; the whole model is built on the host only)",
    ]
    return "\n".join(lines)
