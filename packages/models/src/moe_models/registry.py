"""The registry of feed-forward layers a model config can name: `ffn = {"type": NAME, ...}`.

A registered config class is a dataclass with a `d_model` field and a `build()` that returns an
`nn.Module` following the moe_layers contract: `layer(x, *, token_ids=None)` maps `[..., d_model]`
to `[..., d_model]` (a `moe_layers.MoEModule` also reports auxiliary losses and routing
statistics). The built-in layers are registered here the same way a user's are, with
`register_ffn`.

Fields a model owns (`MODEL_FIELDS`: its width, depth and vocabulary) are filled in by the model
config when the class has them; a user never sets them per layer.
"""

from __future__ import annotations

import dataclasses

import moe_layers

MODEL_FIELDS = ("d_model", "n_layers", "vocab_size")

_REGISTRY: dict[str, type] = {}


def register_ffn(name: str, config_cls: type) -> None:
    """Make `ffn=NAME` (and `layer_ffn`, presets, saved configs) build `config_cls(...).build()`."""
    if not (isinstance(name, str) and name):
        raise ValueError(f"an FFN name must be a non-empty string, got {name!r}")
    if not dataclasses.is_dataclass(config_cls) or not isinstance(config_cls, type):
        raise ValueError(f"register_ffn({name!r}, ...) needs a dataclass type, got {config_cls!r}")
    if "d_model" not in {f.name for f in dataclasses.fields(config_cls)}:
        raise ValueError(f"{config_cls.__name__} needs a d_model field (the model fills it)")
    if not callable(getattr(config_cls, "build", None)):
        raise ValueError(f"{config_cls.__name__} needs a build() method returning the layer")
    known = _REGISTRY.get(name)
    # the same class from a module imported again (a reload) replaces the old one
    reloaded = known is not None and (known.__module__, known.__qualname__) == (
        config_cls.__module__,
        config_cls.__qualname__,
    )
    if known is not None and known is not config_cls and not reloaded:
        raise ValueError(f"an FFN named {name!r} is registered already ({known.__name__})")
    _REGISTRY[name] = config_cls


def ffn_config_class(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown ffn type {name!r}; registered: {', '.join(_REGISTRY)} "
            "(a layer of your own is registered with moe_models.register_ffn, or --plugin in the CLI)"
        )
    return _REGISTRY[name]


def ffn_name(config) -> str:
    """The registered name of an FFN config (or config class)."""
    cls = config if isinstance(config, type) else type(config)
    for name, registered in _REGISTRY.items():
        if registered is cls:
            return name
    raise ValueError(
        f"{cls.__name__} is not a registered FFN config class (register it with "
        "moe_models.register_ffn)"
    )


def registered_ffns() -> list[str]:
    return list(_REGISTRY)


BUILTIN_FFNS = {
    "dense": moe_layers.DenseFFN,
    "sigma_moe": moe_layers.SigmaMoE,
    "topk": moe_layers.TopKFFN,
    "pkm": moe_layers.PKM,
    "switch": moe_layers.SwitchMoE,
    "sbase": moe_layers.SBaseMoE,
    "gshard": moe_layers.GShardMoE,
    "base": moe_layers.BaseLayer,
    "hash": moe_layers.HashLayer,
    "tmoe": moe_layers.TMoE,
    "token_choice": moe_layers.TokenChoiceMoE,
}
for _name, _layer in BUILTIN_FFNS.items():
    register_ffn(_name, _layer.Config)
