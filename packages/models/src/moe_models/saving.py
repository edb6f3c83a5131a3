"""A model as a folder: `model.safetensors` (the weights) and `config.json` (what rebuilds it).

`save_pretrained(model, folder)` writes both; `load_pretrained(folder)` builds the model from the
config and loads the weights. The loading needs nothing of this module, which is the point:

    config = json.loads((folder / "config.json").read_text())
    model = moe_models.build(moe_models.config_from_dict(config["model"]))
    safetensors.torch.load_model(model, folder / "model.safetensors")

Tied weights (a head sharing the embedding matrix) are stored once; `safetensors.torch` drops
and restores the duplicate names the same way on both sides.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from moe_models.api import build
from moe_models.config import config_from_dict, config_to_dict

FORMAT = "moe-models"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_pretrained(model: nn.Module, folder, **extra) -> Path:
    """Write `folder/model.safetensors` and `folder/config.json`; returns the folder.

    config.json holds `format`, `version`, `arch`, `model` (the `config_to_dict` of the model's
    config), `moe_models_version` and the JSON-serialisable `extra` items (moe-train records the
    plugins a layer needs, the tokenizer file and where the model came from).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(model, str(folder / WEIGHTS), metadata={"format": "pt"})
    config = {
        "format": FORMAT,
        "version": VERSION,
        "arch": model.config.arch,
        "model": config_to_dict(model.config),
        "moe_models_version": version("moe-models"),
        **extra,
    }
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_config(folder) -> dict:
    """The config.json `save_pretrained` wrote in `folder`; ValueError naming what is wrong."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ValueError(f"{folder} holds no {CONFIG} (not a saved model folder)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a moe-models config (format {FORMAT!r})")
    if config.get("version") != VERSION:
        raise ValueError(f"{path} has version {config.get('version')!r}, expected {VERSION}")
    return config


def load_pretrained(folder, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model `save_pretrained` wrote in `folder`, in eval mode, on `map_location`.

    A layer type from a plugin must be registered (its module imported) first; the ValueError
    for an unknown layer names the plugins config.json records.
    """
    folder = Path(folder)
    config = read_config(folder)
    try:
        cfg = config_from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        plugins = config.get("plugins") or []
        hint = f" (its layers come from {', '.join(plugins)}: import that first)" if plugins else ""
        raise ValueError(f"{folder / CONFIG}: model config is not valid: {e}{hint}") from None
    model = build(cfg)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{folder} holds no {WEIGHTS}")
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise ValueError(f"{weights} does not fit the model of {CONFIG}: {detail}") from None
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not fit the model of {CONFIG}: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}"
        )
    return model.to(map_location).eval()
