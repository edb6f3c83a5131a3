"""What several subcommands share: the `--plugin` flag (loading models: `moe_train.loading`)."""

from __future__ import annotations

import argparse

from moe_train.config import load_plugins
from moe_train.plugins import canonical


def add_plugin_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="PATH_OR_MODULE",
        help="a .py file or module that registers layers (moe_models.register_ffn); repeatable",
    )


def plugins(args) -> list[str]:
    """The `--plugin` values, loaded, in the form a run's config records."""
    specs = [canonical(p) for p in args.plugin]
    load_plugins(specs)
    return specs
