"""Named configurations, read from the table in `presets.toml` (see its header for the format)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from moe_models.config import ModelConfig

DEFAULT_SIZE_TOLERANCE = 0.02
_ROW_KEYS = ("base", "source", "description", "paper_size", "size_tolerance")


@dataclass(frozen=True)
class Preset:
    """One row of the table: the model config and where it comes from.

    paper_size: the parameter count its paper states (None where the paper has no such model);
    tests hold the preset within `size_tolerance` of it.
    """

    name: str
    config: ModelConfig
    source: str
    description: str
    paper_size: int | None = None
    size_tolerance: float = DEFAULT_SIZE_TOLERANCE


def _row(name: str, row: dict, bases: dict) -> Preset:
    fields = dict(bases[row["base"]]) if "base" in row else {}
    fields.update({k: v for k, v in row.items() if k not in _ROW_KEYS})
    return Preset(
        name=name,
        config=ModelConfig(**fields),
        source=row["source"],
        description=row["description"],
        paper_size=row.get("paper_size"),
        size_tolerance=row.get("size_tolerance", DEFAULT_SIZE_TOLERANCE),
    )


@cache
def _table() -> dict[str, Preset]:
    text = resources.files("moe_models").joinpath("presets.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    return {name: _row(name, row, data["base"]) for name, row in data["presets"].items()}


def presets() -> list[str]:
    """Names of every preset; the tiny ones start with "tiny-"."""
    return list(_table())


def preset_info(name: str) -> Preset:
    if name not in _table():
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(_table())}")
    return _table()[name]


def preset(name: str) -> ModelConfig:
    return preset_info(name).config
