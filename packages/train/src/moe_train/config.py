"""Run configuration: a model preset, training options, and how command-line input reaches them.

A run is described by a `RunConfig`: the preset name, the `--data` spec, the model config (a
moe_models config dataclass) and a `TrainConfig`. It is resolved in this order, later wins:

1. the preset's model config and the `TrainConfig` defaults;
2. `--config FILE` (JSON or TOML) with optional top-level `preset` and `data` and tables `model` and
   `train` (the `config.json` a run writes has this shape, so it can be fed back);
3. flags such as `--max-steps` or `--lr`;
4. `key=value` overrides: a bare key (`d_model=64`) or `model.KEY` sets a model field, `train.KEY`
   (`train.lr=3e-4`) a training field, `ffn.KEY` and `attention.KEY` (`attention=switchhead
   attention.n_experts=4`) an option of the model's FFN or attention. Values are read as the
   type of the field they replace.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_train import plugins as plugins_mod
from moe_train.errors import CLIError

DEFAULT_PRESET = "tiny-sigma-moe"
# seeds reach torch.manual_seed (below 2**64, and the trainer derives per-rank seeds from them)
# and numpy: 2**32 - 1, numpy's own bound, keeps every use in range
MAX_SEED = 2**32 - 1
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
FSDP_DTYPES = ("fp32", "bf16")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


def _models():
    """moe_models, imported where a model config is made or read: it imports torch, which the
    command-line parsers (and so `moe-train --help`) must not."""
    import moe_models

    return moe_models


@dataclass
class TrainConfig:
    """Training options; every field can be set with `train.FIELD=VALUE`.

    batch_size is the global batch of one optimiser step (summed over ranks and accumulation
    micro-batches); it must be divisible by world_size * grad_accum. The segment length is the
    model's `seq_len` (the XL unroll, the decoder's context), set like any model field.
    eval_batches caps the evaluations during training, final_eval_batches the one at the end
    (0: the whole validation split).
    The layout of a torchrun run (moe_train.parallelize; README "Distributed"): dp_replicate
    groups of dp_shard ranks (-1: the ranks left), the model sharded over each group with FSDP2
    (reshard_after_forward: free the gathered weights after each block's forward), the routed
    experts sharded over ep of those ranks (ep divides dp_shard; expert_parallel=true is
    ep=dp_shard); param_dtype and reduce_dtype are FSDP2's mixed precision (the dtype of the
    gathered weights and of the gradient reduction). activation_checkpointing: none, full
    (recompute each block in backward) or selective (recompute all but the matmuls' outputs).
    async_checkpoint: write checkpoints in the background (DCP's async save).
    skip_memory_check turns off the memory preflight (moe_train.memory), for when its estimate
    is known to be too pessimistic. compile runs the model through torch.compile (compiled in
    place, so checkpoints keep the plain model's parameter names and load without it). Defaults
    are sized so that `moe-train train` on the tiny σ-MoE preset finishes in a few minutes on two
    CPU cores.
    """

    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    warmup_steps: int = 50
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.25
    eval_interval: int = 500
    eval_batches: int = 20
    final_eval_batches: int = 0
    eval_batch_size: int = 32
    log_interval: int = 10
    routing_interval: int = 100
    save_interval: int = 500
    keep_last: int = 2
    seed: int = 0
    precision: str = "fp32"
    device: str = "auto"
    expert_parallel: bool = False
    skip_memory_check: bool = False
    compile: bool = False
    dp_replicate: int = 1
    dp_shard: int = -1
    ep: int = 1
    reshard_after_forward: bool = True
    param_dtype: str = "fp32"
    reduce_dtype: str = "fp32"
    activation_checkpointing: str = "none"
    async_checkpoint: bool = False

    def validate(self) -> None:
        """Raise a CLIError naming the first option whose value is out of range or not finite."""
        positive_ints = (
            "max_steps",
            "batch_size",
            "eval_batch_size",
            "grad_accum",
            "log_interval",
            "eval_interval",
            "routing_interval",
            "save_interval",
            "keep_last",
        )
        for name in positive_ints:
            _check(self, name, lambda v: v > 0, "a positive integer")
        for name in ("warmup_steps", "eval_batches", "final_eval_batches"):
            _check(self, name, lambda v: v >= 0, "an integer >= 0")
        _check(self, "seed", lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")
        _check(self, "lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
        for name in ("weight_decay", "grad_clip"):
            _check(self, name, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
        _check(self, "min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]")
        for name in ("beta1", "beta2"):
            _check(self, name, lambda v: 0 <= v < 1, "in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise CLIError(
                f"train.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        for name in ("dp_replicate", "ep"):
            _check(self, name, lambda v: v > 0, "a positive integer")
        _check(self, "dp_shard", lambda v: v > 0 or v == -1, "a positive integer or -1")
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in FSDP_DTYPES:
                raise CLIError(
                    f"train.{name} must be one of {', '.join(FSDP_DTYPES)}, "
                    f"got {getattr(self, name)!r}"
                )
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise CLIError(
                "train.activation_checkpointing must be one of "
                f"{', '.join(ACTIVATION_CHECKPOINTING)}, got {self.activation_checkpointing!r}"
            )
        if self.precision not in PRECISIONS:
            raise CLIError(
                f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )

    def notes(self) -> list[str]:
        """Settings that are allowed but probably not what was meant."""
        if self.warmup_steps > self.max_steps:
            return [
                f"train.warmup_steps={self.warmup_steps} exceeds train.max_steps={self.max_steps}: "
                "the learning rate never reaches train.lr"
            ]
        return []


def _check(cfg: TrainConfig, name: str, ok, requirement: str) -> None:
    value = getattr(cfg, name)
    # NaN fails every comparison, so `ok` rejects it too
    if not ok(value):
        raise CLIError(f"train.{name} must be {requirement}, got {value!r}")


@dataclass
class RunConfig:
    """preset: the name the model started from; plugins: the `--plugin` modules or files that
    register the run's layers (loaded again by eval, --resume and every command reading it)."""

    preset: str
    data: str | None
    model: Any
    train: TrainConfig = field(default_factory=TrainConfig)
    plugins: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "preset": self.preset,
            "data": self.data,
            "plugins": list(self.plugins),
            "model": _models().config_to_dict(self.model),
            "train": dataclasses.asdict(self.train),
        }

    @classmethod
    def from_dict(
        cls,
        d: dict,
        *,
        trust_plugins: bool = False,
        where: str = "the saved run",
        offer_trust: bool = True,
    ) -> RunConfig:
        """The config a run saved. Its plugins are imported only when the user named them
        (`--plugin`, imported before) or `trust_plugins` (`moe_train.plugins.load_recorded`);
        when the model needs one that was not imported, the error names it (and offers
        `--trust-plugins` where the command has it)."""
        plugins = list(d.get("plugins", []))
        missing = plugins_mod.load_recorded(plugins, trust=trust_plugins)
        try:
            model = _models().config_from_dict(d["model"])
        except (KeyError, TypeError, ValueError) as e:
            if missing:
                raise CLIError(plugins_mod.not_imported(where, missing, offer_trust)) from None
            raise CLIError(f"{where}: saved model config is not valid: {e}") from None
        train = apply_train_overrides(TrainConfig(), d.get("train", {}), source="saved config")
        return cls(
            preset=d.get("preset", "custom"),
            data=d.get("data"),
            model=model,
            train=train,
            plugins=plugins,
        )


def parse_value(text: str, key: str, hint) -> Any:
    from moe_models.config import parse_text

    try:
        return parse_text(text, hint, key)
    except ValueError as e:
        raise CLIError(f"override {e}") from None


def split_overrides(items: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """`key=value` strings -> (model overrides, train overrides), values still text."""
    model, train = {}, {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"cannot read {item!r}: overrides are KEY=VALUE (e.g. d_model=64)")
        if key.startswith("train."):
            train[key.removeprefix("train.")] = value
        else:
            model[key.removeprefix("model.")] = value
    return model, train


def apply_train_overrides(cfg: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CLIError(
            f"unknown training option(s) {', '.join('train.' + k for k in unknown)} in {source}; "
            f"known: {', '.join(sorted(known))}"
        )
    typed = {}
    hints = typing.get_type_hints(TrainConfig)
    for key, value in values.items():
        current = getattr(cfg, key)
        if isinstance(value, str) and not isinstance(current, str):
            value = parse_value(value, f"train.{key}", hints[key])
        elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif type(value) is not type(current):
            raise CLIError(
                f"train.{key} in {source}: expected a value like {current!r}, got {value!r}"
            )
        typed[key] = value
    return dataclasses.replace(cfg, **typed)


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"config file {path} does not exist")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f"config file {path} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise CLIError(f"config file {path} must hold a table/object at the top level")
    unknown = sorted(set(data) - {"preset", "data", "plugins", "model", "train"})
    if unknown:
        raise CLIError(
            f"config file {path}: unknown key(s) {', '.join(unknown)}; "
            "expected preset, data, plugins, model, train"
        )
    for table in ("model", "train"):
        if not isinstance(data.get(table, {}), dict):
            raise CLIError(f"config file {path}: {table} must be a table/object")
    return data


def model_config(preset: str, overrides: dict[str, Any]) -> Any:
    """The preset's model config with `overrides` (text values are read as the fields' types)."""
    try:
        return _models().get_config(preset, **overrides)
    except (ValueError, TypeError) as e:
        raise CLIError(f"model config: {e}") from None


def load_plugins(specs: list[str]) -> None:
    """Import each `--plugin`: a `.py` file or an importable module that registers layers."""
    for spec in specs:
        plugins_mod.load(spec)


def resolve(
    *,
    plugins: list[str] = (),
    preset: str | None = None,
    config_file: str | None = None,
    data: str | None = None,
    flags: dict[str, Any] | None = None,
    model_flags: dict[str, Any] | None = None,
    overrides: list[str] = (),
) -> RunConfig:
    """Build the RunConfig from preset, config file, flags and `key=value` overrides (later wins).

    flags maps TrainConfig field names to values, model_flags model fields (--seq-len); None
    values are ignored (flag not given).
    """
    file = load_config_file(config_file) if config_file else {}
    specs = list(
        dict.fromkeys(plugins_mod.canonical(p) for p in [*file.get("plugins", []), *plugins])
    )
    load_plugins(specs)
    name = preset or file.get("preset") or DEFAULT_PRESET
    model_over, train_over = split_overrides(list(overrides))
    given_model = {k: v for k, v in (model_flags or {}).items() if v is not None}
    model_cfg = model_config(name, {**file.get("model", {}), **given_model, **model_over})
    train = apply_train_overrides(TrainConfig(), file.get("train", {}), source=str(config_file))
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    train = apply_train_overrides(train, given, source="flags")
    train = apply_train_overrides(train, train_over, source="the command line")
    train.validate()
    spec = data if data is not None else file.get("data")
    return RunConfig(preset=name, data=spec, model=model_cfg, train=train, plugins=specs)


def _argument_type(name: str, parse, ok, requirement: str):
    """An argparse `type=`: argparse puts the option's name before the message."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    convert.__name__ = name
    return convert


positive_int = _argument_type("positive_int", int, lambda v: v > 0, "a positive integer")
non_negative_int = _argument_type("non_negative_int", int, lambda v: v >= 0, "an integer >= 0")
seed_int = _argument_type(
    "seed_int", int, lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"
)
positive_float = _argument_type(
    "positive_float", float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0"
)
