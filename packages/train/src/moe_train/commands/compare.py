"""`moe-train compare`: train several presets alike and write one table (see moe_train.compare)."""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from moe_train.commands.common import add_plugin_flag
from moe_train.config import load_plugins
from moe_train.errors import CLIError
from moe_train.plugins import canonical, load_recorded, not_imported

NAME = "compare"
HELP = "train several presets alike and compare them in one table"
EPILOG = """\
every run gets the same data, steps, batch size, seeds and evaluation; seq_len is each preset's
own unless --seq-len or seq_len=N says otherwise; KEY=VALUE overrides (as for `train`) apply to
every run. Evaluations, checkpoints and routing records come every max(1, max_steps // 10)
steps unless train.eval_interval / save_interval / routing_interval say otherwise.

writes DIR/compare.json (the comparison), DIR/runs/NAME-seedS/ (ordinary run folders that
`moe-train eval` reads, each with result.json once finished), DIR/results.md, results.csv,
results.json and, with matplotlib (pip install 'moe-train[plots]'), PNG plots: validation loss
against steps, wall time and training FLOPs (steps x tokens/step x FLOPs/token x 3), and the
expert usage of each MoE run.

resuming: rerun the same command (or `moe-train compare --out DIR --resume`): finished runs are
skipped, a half-done one continues from its latest checkpoint.

--twins params|compute adds after each MoE preset its dense twin (moe_models.dense_twin), named
PRESET~dense-params or PRESET~dense-compute. --sweep FILE.toml takes the runs and shared options
from a file (the format: docs/compare.md); flags given as well override its options.
"""
PARSER = dict(
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    description="Train each preset on the same data and budget, one run after another, then "
    "write tables (valid/test bpc or perplexity, sizes, FLOPs, speed, routing) and plots.",
)

# flag -> the Spec field it sets (None when not given)
SPEC_FLAGS = (
    "data",
    "max_steps",
    "batch_size",
    "seq_len",
    "task",
    "k_shot",
    "normalize",
    "nproc_per_node",
    "device",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "items",
        nargs="*",
        metavar="PRESET|KEY=VALUE",
        help="presets to compare, and overrides applied to every run",
    )
    p.add_argument("--sweep", help="TOML file of runs and shared options (docs/compare.md)")
    p.add_argument("--data", help="KIND:PATH as for `train` (default: built-in corpus)")
    p.add_argument("--max-steps", type=int, help="steps of every run (default 1000)")
    p.add_argument("--seeds", help="number of seeds (0..S-1) or a list such as 0,3 (default 1)")
    p.add_argument(
        "--twins",
        help="add the dense twin of each MoE preset: params, compute or params,compute",
    )
    p.add_argument("--batch-size", type=int, help="global batch of every run (default 16)")
    p.add_argument("--seq-len", type=int, help="segment length of every run (default: preset's)")
    p.add_argument("--task", help="priming task JSONL file, or `default` for the shipped one")
    p.add_argument("--k-shot", type=int, help="demonstrations per priming prompt (default 0)")
    p.add_argument(
        "--normalize",
        action="store_const",
        const=True,
        help="score priming choices by mean, not sum, log-likelihood",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        help="train each run under torchrun with N processes (default 1: in this process)",
    )
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    add_plugin_flag(p)
    p.add_argument("--out", help="comparison folder (default runs/compare-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the comparison saved in --out")
    p.add_argument(
        "--plan", action="store_true", help="print the runs, their sizes and FLOPs; train nothing"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")


def _resume_spec(args, presets: list[str], overrides: list[str]):
    from moe_train.compare import Spec, read_manifest

    if not args.out:
        raise CLIError("--resume needs --out DIR (the comparison to continue)")
    given = [f"--{k.replace('_', '-')}" for k in SPEC_FLAGS if getattr(args, k) is not None]
    given += [f for f, v in (("--seeds", args.seeds), ("--twins", args.twins)) if v is not None]
    given += ["--sweep"] * bool(args.sweep)
    if presets or overrides or given:
        what = ", ".join([*presets, *overrides, *given])
        raise CLIError(f"--resume continues the comparison saved in --out; drop {what}")
    load_plugins([canonical(p) for p in args.plugin])
    spec = Spec.from_dict(read_manifest(Path(args.out)))
    missing = load_recorded(spec.plugins, trust=False)
    if missing:
        raise CLIError(not_imported(f"the comparison {args.out}", missing, offer_trust=False))
    return spec, Path(args.out)


def spec_from_args(args):
    """(Spec, output folder) from the command line and, with --sweep, the sweep file."""
    from moe_train.compare import build_spec, load_sweep, parse_seeds, parse_twins

    presets = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if args.resume:
        return _resume_spec(args, presets, overrides)
    fields: dict = {}
    out = None
    if args.sweep:
        if presets:
            raise CLIError(
                f"give the presets in the sweep file or on the command line, not both "
                f"({', '.join(presets)} and --sweep {args.sweep})"
            )
        fields = load_sweep(args.sweep)
        entries = fields.pop("entries")
        out = fields.pop("out", None)
    elif presets:
        entries = [{"name": p, "preset": p} for p in presets]
    else:
        raise CLIError("name the presets to compare (or give --sweep FILE, or --out DIR --resume)")
    if args.twins is not None:
        twins = parse_twins(args.twins, "--twins")
        entries = [{**e, "twins": twins} for e in entries]
    for key in SPEC_FLAGS:
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    if args.seeds is not None:
        fields["seeds"] = parse_seeds(args.seeds, "--seeds")
    fields["overrides"] = [*fields.get("overrides", []), *overrides]
    plugins = [canonical(p) for p in [*fields.get("plugins", []), *args.plugin]]
    fields["plugins"] = list(dict.fromkeys(plugins))
    load_plugins(fields["plugins"])
    spec = build_spec(entries, **fields)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return spec, Path(args.out or out or f"runs/compare-{stamp}")


def print_plan(spec) -> None:
    from moe_train.compare import plan, sizes

    seen = set()
    rows = [("run", "preset", "twin", "arch", "seq_len", "params", "active", "FLOPs/token")]
    for r in plan(spec):
        if r.entry.name in seen:
            continue
        seen.add(r.entry.name)
        s = sizes(r.cfg)
        rows.append(
            (
                r.entry.name,
                r.entry.preset,
                r.entry.twin or "",
                r.cfg.model.arch,
                str(r.cfg.model.seq_len),
                f"{s['params']:,}",
                f"{s['active_params']:,}",
                f"{s['flops_per_token']:,}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"{len(spec.entries)} model(s) x {len(spec.seeds)} seed(s), {spec.max_steps} steps each")


def run(args) -> int:
    from moe_train import compare

    spec, out = spec_from_args(args)
    if args.plan:
        print_plan(spec)
        return 0
    done = compare.run(
        spec, out, progress=not args.no_progress, tensorboard=not args.no_tensorboard
    )
    if not done:
        print(f"stopped; continue with: moe-train compare --out {out} --resume")
    return 0
