"""What several subcommands share: the `--plugin` flag and loading a checkpoint for inference."""

from __future__ import annotations

import argparse

import moe_models

from moe_train import checkpoint as ckpt
from moe_train.config import RunConfig, load_plugins
from moe_train.errors import CLIError
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


def load_for_inference(args, path: str, data: str | None, device_name: str):
    """(payload, RunConfig, corpus, model on device, device) of a checkpoint, all validated."""
    from moe_train.data import load_corpus
    from moe_train.distributed import pick_device
    from moe_train.trainer import load_model_state

    plugins(args)
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
