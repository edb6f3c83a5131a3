"""The registries of the layers a model config can name: feed-forward layers (`ffn = {"type":
NAME, ...}`) and self-attention layers (`attention = {"type": NAME, ...}`, see moe_models.attention
for their contract).

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
# the fields of an attention config its model fills: width, depth, heads, attention dropout and
# the kind of generation state the architecture keeps ("memory": the Transformer-XL memory of
# earlier layer inputs, which the model holds; "cache": a state the attention returns, e.g. a
# key/value cache) and whether it normalises its own query/key/selector inputs (MoEUT's peri-LN)
ATTENTION_MODEL_FIELDS = (
    "d_model",
    "n_layers",
    "n_heads",
    "d_head",
    "attn_dropout",
    "state_kind",
    "peri_norm",
)
STATE_KINDS = ("memory", "cache")

_REGISTRY: dict[str, type] = {}
_ATTENTIONS: dict[str, type] = {}


def _register(registry: dict, what: str, function: str, name: str, config_cls: type) -> None:
    if not (isinstance(name, str) and name):
        raise ValueError(f"an {what} name must be a non-empty string, got {name!r}")
    if not dataclasses.is_dataclass(config_cls) or not isinstance(config_cls, type):
        raise ValueError(f"{function}({name!r}, ...) needs a dataclass type, got {config_cls!r}")
    if "d_model" not in {f.name for f in dataclasses.fields(config_cls)}:
        raise ValueError(f"{config_cls.__name__} needs a d_model field (the model fills it)")
    if not callable(getattr(config_cls, "build", None)):
        raise ValueError(f"{config_cls.__name__} needs a build() method returning the layer")
    known = registry.get(name)
    # the same class from a module imported again (a reload) replaces the old one
    reloaded = known is not None and (known.__module__, known.__qualname__) == (
        config_cls.__module__,
        config_cls.__qualname__,
    )
    if known is not None and known is not config_cls and not reloaded:
        raise ValueError(f"an {what} named {name!r} is registered already ({known.__name__})")
    registry[name] = config_cls


def register_ffn(name: str, config_cls: type) -> None:
    """Make `ffn=NAME` (and `layer_ffn`, presets, saved configs) build `config_cls(...).build()`."""
    _register(_REGISTRY, "FFN", "register_ffn", name, config_cls)


def register_attention(name: str, config_cls: type) -> None:
    """Make `attention=NAME` (presets, saved configs, the CLI) build `config_cls(...).build()`.

    `config_cls` is a dataclass with a `d_model` field and a `build()` returning a module that
    follows the attention contract of moe_models.attention; it declares the generation state it
    keeps in the class attribute `state_kinds` (a tuple of "memory" and/or "cache")."""
    kinds = getattr(config_cls, "state_kinds", None)
    if not (isinstance(kinds, tuple) and kinds and set(kinds) <= set(STATE_KINDS)):
        raise ValueError(
            f"register_attention({name!r}, ...): the config class needs a class attribute "
            f"state_kinds, a non-empty tuple of {STATE_KINDS}, got {kinds!r}"
        )
    _register(_ATTENTIONS, "attention", "register_attention", name, config_cls)


def _config_class(registry: dict, what: str, function: str, name: str) -> type:
    if name not in registry:
        raise ValueError(
            f"unknown {what} type {name!r}; registered: {', '.join(registry)} (a layer of your "
            f"own is registered with moe_models.{function}, or --plugin in the CLI)"
        )
    return registry[name]


def _registered_name(registry: dict, what: str, function: str, config) -> str:
    cls = config if isinstance(config, type) else type(config)
    for name, registered in registry.items():
        if registered is cls:
            return name
    raise ValueError(
        f"{cls.__name__} is not a registered {what} config class (register it with "
        f"moe_models.{function})"
    )


def ffn_config_class(name: str) -> type:
    return _config_class(_REGISTRY, "ffn", "register_ffn", name)


def ffn_name(config) -> str:
    """The registered name of an FFN config (or config class)."""
    return _registered_name(_REGISTRY, "FFN", "register_ffn", config)


def registered_ffns() -> list[str]:
    return list(_REGISTRY)


def attention_config_class(name: str) -> type:
    return _config_class(_ATTENTIONS, "attention", "register_attention", name)


def attention_name(config) -> str:
    """The registered name of an attention config (or config class)."""
    return _registered_name(_ATTENTIONS, "attention", "register_attention", config)


def registered_attentions() -> list[str]:
    return list(_ATTENTIONS)


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
