"""What several subcommands share: the `--plugin` flag and the vocabulary `--data` of the commands
that read a trained model (loading models: `moe_train.loading`)."""

from __future__ import annotations

import argparse

from moe_train.config import load_plugins
from moe_train.plugins import canonical


def add_plugin_flag(p: argparse.ArgumentParser, *, trust: bool = False) -> None:
    """`--plugin`; with `trust` (the commands that load a trained model) `--trust-plugins` too."""
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="PATH_OR_MODULE",
        help="a .py file or module that registers layers (moe_models.register_ffn); repeatable",
    )
    if not trust:
        return
    p.add_argument(
        "--trust-plugins",
        action="store_true",
        help="import the plugins that the run or export records (by default only those named "
        "with --plugin are: loading a model runs no code you did not name)",
    )


def add_vocab_data_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        help="use this data spec's vocabulary instead of the run's tokenizer.json (for runs "
        "written before runs kept their tokenizer)",
    )


def plugins(args) -> list[str]:
    """The `--plugin` values, loaded, in the form a run's config records."""
    specs = [canonical(p) for p in args.plugin]
    load_plugins(specs)
    return specs
