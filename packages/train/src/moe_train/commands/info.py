"""`moe-train info`: a config's resolved form, parameter counts and FLOPs; `--list` the presets."""

from __future__ import annotations

import json

from moe_train.commands.common import add_plugin_flag
from moe_train.config import DEFAULT_PRESET, resolve

NAME = "info"
HELP = "a preset's resolved config, parameter counts and FLOPs"


def add_arguments(p) -> None:
    p.add_argument("--preset", help=f"default {DEFAULT_PRESET}")
    p.add_argument("--config", help="JSON or TOML run config file")
    p.add_argument(
        "--list", action="store_true", help="list the presets: name, parameters, description"
    )
    add_plugin_flag(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


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
        print(f"{'preset':<{width}}  {'params':>7}  {'active':>7}  description")
        for name, total, active, description in rows:
            print(f"{name:<{width}}  {total:>7}  {active:>7}  {description}")
        return 0
    cfg = resolve(
        plugins=args.plugin, preset=args.preset, config_file=args.config, overrides=args.overrides
    )
    counts = moe_models.count_parameters(cfg.model)
    info = {
        **cfg.to_dict(),
        "parameters": counts,
        "flops_per_token": moe_models.flops_per_token(cfg.model),
    }
    print(json.dumps(info, indent=2))
    return 0
