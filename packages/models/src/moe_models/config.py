"""The model config: one frozen dataclass, its validation, overrides and JSON round trip.

A `ModelConfig` describes one language model. Its `ffn` is the config of the feed-forward layer
of its MoE layers: an instance of a registered layer config class (`moe_models.registry`), e.g.
`moe_layers.SigmaMoE.Config`, with the fields the model owns (d_model, n_layers, vocab_size)
filled in from the model. `ffn` may also be given as a registered name or a dict
`{"type": NAME, **options}`; missing `d_ff` and `activation` then come from the model's.
`layer_ffn` replaces the layer of chosen layers, so layers may differ. Its `attention` is the
config of the self-attention of every layer in the same way (moe_models.attention): None gives
the architecture's own, and the fields the model owns (width, depth, heads, attention dropout,
the kind of generation state) are filled in from the model.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from moe_models.attention import ARCH_STATE_KIND, DEFAULT_ATTENTION
from moe_models.registry import (
    ATTENTION_MODEL_FIELDS,
    MODEL_FIELDS,
    attention_config_class,
    attention_name,
    ffn_config_class,
    ffn_name,
)

ARCHS = ("transformer_xl", "decoder", "smlp", "moeut")
POSITIONS = ("sinusoidal", "learned")
SMLP_ROUTINGS = ("deterministic", "learned")
MOE_PLACEMENTS = ("ffn", "standalone")
# options an FFN given by name or dict takes from the model when it does not set them
MODEL_DEFAULTS = ("d_ff", "activation")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """One language model.

    arch: "transformer_xl" (relative positions, segment memory, pre-LN), "decoder" (pre-LN
        Transformer with absolute positions, fairseq style), "smlp" (sparse all-MLP) or "moeut"
        (shared layer groups with σ-MoE FFNs and SwitchHead attention, peri-layernorm, segment
        memory; moe_models.moeut).
    moeut_group_size: MoEUT's G, the distinct layers the model repeats n_layers / G times.
    seq_len: the training segment length (the XL unroll T; the decoder's and sMLP's context).
    mem_len: Transformer-XL memory length (None: seq_len, i.e. one previous segment).
    d_ff, activation: the dense FFN of the layers that are not MoE layers, and the defaults of
        `ffn` given by name (so `ffn="dense"` on a MoE preset gives its parameter-equal twin).
    ffn: the layer config of the MoE layers (see the module docstring).
    moe_interval: layer i uses `ffn` when (i + 1) % moe_interval == 0 and the dense FFN otherwise
        (fairseq's moe_freq); 1 puts `ffn` in every layer. In the sMLP model it places the sparse
        blocks instead; 0 there gives the dense gMLP baseline.
    n_moe_layers: None (moe_interval places the MoE layers) or n >= 1: n MoE layers where fairseq
        puts its n BASE layers (--base-layers; `moe_interval` is then unused). fairseq's decoder
        inserts BASE layer i = 0, ..., n-1 at index ((i+1)·L)//(n+1) of its list of layers, which
        by then holds the i earlier ones; here the MoE layers are the layers those insertions
        follow (`fairseq_base_positions`): n = 1 is the layer L//2 - 1; as each index counts the
        BASE layers inserted before it, later ones move forward: L = 24 and n = 3 give layers 5,
        10, 15 (not 5, 11, 17), L = 8 and n = 3 layers 1, 2, 3. Each insertion must follow a
        layer of its own: n too large for L (a BASE layer before the first layer, or two after
        one layer) is an error.
    moe_placement: where `ffn` goes in the MoE layers: "ffn" (it is the layer's FFN) or
        "standalone" (fairseq's BASE layers: the layer keeps the dense FFN, and `ffn` follows it
        as a residual block of its own, x + ffn(x), on the un-normalised residual stream, without
        LayerNorm or dropout; transformer_xl and decoder). With a BASE layer, expert_norm=True and
        zero_init_output=True make it fairseq's BASE block (which, with expert_bias=True as
        fairseq's, does not start as the identity: the output bias keeps its init).
    layer_ffn: {layer index: layer config} overriding the FFN of single layers.
    attention: the self-attention config of every layer (see the module docstring); None: the
        architecture's own ("relative" for transformer_xl, "causal" for decoder).
    smlp_*: the sMLP's gMLP hidden size, its sMoE experts (chunks of d_model), their routing and
        the routing prefix's share of the sequence.
    """

    arch: str = "transformer_xl"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_head: int | None = None
    seq_len: int = 64
    mem_len: int | None = None
    dropout: float = 0.0
    attn_dropout: float = 0.0
    attention: Any = None
    tie_embeddings: bool = False
    positions: str = "sinusoidal"
    scale_embeddings: bool = False
    d_ff: int = 512
    activation: str = "relu"
    ffn: Any = "dense"
    moe_interval: int = 1
    moe_placement: str = "ffn"
    n_moe_layers: int | None = None
    layer_ffn: dict[int, Any] = field(default_factory=dict)
    moeut_group_size: int = 1
    smlp_d_ff: int = 0
    smlp_n_chunks: int = 4
    smlp_routing: str = "deterministic"
    smlp_prefix_fraction: float = 0.2

    def __post_init__(self) -> None:
        _check_model_fields(self)
        object.__setattr__(self, "ffn", ffn_config(self.ffn, self, where="ffn"))
        layer_ffn = {}
        for i, spec in self.layer_ffn.items():
            index = _layer_index(i, self.n_layers)
            layer_ffn[index] = ffn_config(spec, self, where=f"layer_ffn[{index}]")
        object.__setattr__(self, "layer_ffn", layer_ffn)
        _check_layers(self)
        object.__setattr__(self, "attention", _resolve_attention(self))

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def memory_length(self) -> int:
        return self.seq_len if self.mem_len is None else self.mem_len

    def is_moe_layer(self, i: int) -> bool:
        if self.n_moe_layers is not None:
            return i in fairseq_base_positions(self.n_layers, self.n_moe_layers)
        return self.moe_interval >= 1 and (i + 1) % self.moe_interval == 0

    def layer_ffn_config(self, i: int):
        """The FFN config of layer i, after `moe_interval`, `moe_placement` and `layer_ffn`."""
        if i in self.layer_ffn:
            return self.layer_ffn[i]
        if self.is_moe_layer(i) and self.moe_placement == "ffn":
            return self.ffn
        return self.dense_ffn_config()

    def standalone_config(self, i: int):
        """The config of layer i's standalone MoE block (after its FFN), or None."""
        if self.moe_placement == "standalone" and self.is_moe_layer(i):
            return self.ffn
        return None

    def dense_ffn_config(self):
        return ffn_config("dense", self, where="the dense FFN (d_ff, activation)")


def fairseq_base_positions(n_layers: int, n: int) -> list[int | None]:
    """The layers (indices) after which fairseq's decoder puts its n BASE layers, in order; None
    for one put before the first layer. fairseq inserts BASE layer i at list index
    ((i + 1) * n_layers) // (n + 1), one after the other, so each insertion counts the BASE
    layers inserted before it."""
    stack: list[int | None] = list(range(n_layers))
    for i in range(n):
        stack.insert(((i + 1) * n_layers) // (n + 1), None)
    after, last = [], None
    for entry in stack:
        if entry is None:
            after.append(last)
        else:
            last = entry
    return after


def ffn_config(spec, model: ModelConfig, *, where: str, base=None):
    """The layer config `spec` stands for, with the model's fields filled in.

    spec: a registered config instance, a registered name, or a dict of options with an optional
    "type" (default: the type of `base`, whose options the dict then changes). A name switches the
    type and keeps the options the new type shares with `base`.
    """
    if isinstance(spec, str):
        cls = ffn_config_class(spec)
        options = _shared_options(base, cls) if base is not None else {}
    elif isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("type", None)
        if name is None and base is None:
            raise ValueError(f"{where} needs a type (one of the registered FFN names)")
        cls = ffn_config_class(name) if name is not None else type(base)
        options = _options(base) if base is not None and type(base) is cls else {}
        options.update(spec)
    elif dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        ffn_name(spec)
        return _with_model_fields(spec, model, where)
    else:
        raise ValueError(
            f"{where} must be a registered FFN name, a dict of options or a layer config, "
            f"got {spec!r}"
        )
    names = _check_known_options(cls, options, MODEL_FIELDS, where, ffn_name(cls))
    for key in MODEL_DEFAULTS:
        if key in names and key not in options:
            options[key] = getattr(model, key)
    owned = {key: getattr(model, key) for key in MODEL_FIELDS if key in names}
    try:
        return cls(**options, **owned)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


def _resolve_attention(model: ModelConfig):
    if model.arch not in DEFAULT_ATTENTION:
        if model.attention is not None:
            raise ValueError(f"arch {model.arch!r} has no attention; leave attention unset")
        return None
    spec = DEFAULT_ATTENTION[model.arch] if model.attention is None else model.attention
    return attention_config(spec, model, where="attention")


def _attention_fields(model: ModelConfig, cls) -> dict:
    """The fields of attention config class `cls` the model owns, with the model's values."""
    values = {
        "d_model": model.d_model,
        "n_layers": model.n_layers,
        "n_heads": model.n_heads,
        "d_head": model.head_dim,
        "attn_dropout": model.attn_dropout,
        "state_kind": ARCH_STATE_KIND[model.arch],
        "peri_norm": model.arch == "moeut",
    }
    names = {f.name for f in fields(cls)}
    return {key: values[key] for key in ATTENTION_MODEL_FIELDS if key in names}


def attention_config(spec, model: ModelConfig, *, where: str, base=None):
    """The attention config `spec` stands for (a registered config instance, a registered name,
    or a dict of options with an optional "type"), with the model's fields filled in; as
    `ffn_config`."""
    if isinstance(spec, str):
        cls = attention_config_class(spec)
        options = _shared_options(base, cls, ATTENTION_MODEL_FIELDS) if base is not None else {}
    elif isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("type", None)
        if name is None and base is None:
            name = DEFAULT_ATTENTION[model.arch]
        cls = attention_config_class(name) if name is not None else type(base)
        options = (
            _options(base, ATTENTION_MODEL_FIELDS) if base is not None and type(base) is cls else {}
        )
        options.update(spec)
    elif dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        cls = type(spec)
        attention_name(spec)
        options = _options(spec, ATTENTION_MODEL_FIELDS)
    else:
        raise ValueError(
            f"{where} must be a registered attention name, a dict of options or an attention "
            f"config, got {spec!r}"
        )
    kind = ARCH_STATE_KIND[model.arch]
    if kind not in cls.state_kinds:
        raise ValueError(
            f"{where} ({attention_name(cls)}) keeps a {'/'.join(cls.state_kinds)} state, but arch "
            f"{model.arch!r} needs one of kind {kind!r} (see moe_models.attention)"
        )
    _check_known_options(cls, options, ATTENTION_MODEL_FIELDS, where, attention_name(cls))
    owned = _attention_fields(model, cls)
    options = {k: v for k, v in options.items() if k not in owned}
    if dataclasses.is_dataclass(spec) and all(getattr(spec, k) == v for k, v in owned.items()):
        return spec
    try:
        return cls(**options, **owned)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


def _check_known_options(cls, options: dict, owned, where: str, name: str) -> set[str]:
    """The field names of layer config class `cls`; a ValueError listing the valid ones (those
    the model does not own) when `options` names another."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        valid = ", ".join(sorted(names - set(owned)))
        raise ValueError(f"unknown option(s) {unknown} of {where} ({name}); valid: {valid}")
    return names


def _with_model_fields(spec, model, where: str):
    names = {f.name for f in fields(spec)}
    owned = {
        key: getattr(model, key)
        for key in MODEL_FIELDS
        if key in names and getattr(spec, key) != getattr(model, key)
    }
    if not owned:
        return spec
    try:
        return dataclasses.replace(spec, **owned)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


def _options(config, owned=MODEL_FIELDS) -> dict:
    """The options of a layer config that are not the model's."""
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name not in owned}


def _shared_options(base, cls, owned=MODEL_FIELDS) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in _options(base, owned).items() if k in names}


def _layer_index(i, n_layers: int) -> int:
    try:
        index = int(i)
    except (TypeError, ValueError):
        index = None
    if index is None or isinstance(i, bool) or not 0 <= index < n_layers:
        raise ValueError(f"layer_ffn names layer {i!r}, but the model has layers 0..{n_layers - 1}")
    return index


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(
            f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}"
        )


def _positive_int(**values) -> None:
    for name, value in values.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _probability(**values) -> None:
    for name, value in values.items():
        if not (isinstance(value, int | float) and 0.0 <= value < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _check_model_fields(cfg: ModelConfig) -> None:
    """Raise ValueError naming the first impossible model-level option."""
    _choice("arch", cfg.arch, ARCHS)
    _choice("positions", cfg.positions, POSITIONS)
    _choice("moe_placement", cfg.moe_placement, MOE_PLACEMENTS)
    if cfg.moe_placement == "standalone" and cfg.arch not in ("transformer_xl", "decoder"):
        raise ValueError(
            f"moe_placement='standalone' needs arch 'transformer_xl' or 'decoder', got {cfg.arch!r}"
        )
    _positive_int(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        seq_len=cfg.seq_len,
        d_ff=cfg.d_ff,
    )
    _probability(dropout=cfg.dropout, attn_dropout=cfg.attn_dropout)
    if not (isinstance(cfg.moe_interval, int) and cfg.moe_interval >= 0):
        raise ValueError(f"moe_interval must be >= 0, got {cfg.moe_interval!r}")
    if cfg.n_moe_layers is not None:
        n = cfg.n_moe_layers
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            raise ValueError(f"n_moe_layers must be None or an int >= 1, got {n!r}")
        after = fairseq_base_positions(cfg.n_layers, n)
        if None in after or len(set(after)) < n:
            raise ValueError(
                f"n_moe_layers={n} is too many for n_layers={cfg.n_layers}: fairseq's placement "
                f"puts them after layers {after} (None: before the first), not one per layer"
            )
    if cfg.mem_len is not None and not (isinstance(cfg.mem_len, int) and cfg.mem_len >= 0):
        raise ValueError(f"mem_len must be None or >= 0, got {cfg.mem_len!r}")
    if not isinstance(cfg.layer_ffn, dict):
        raise ValueError(f"layer_ffn must be a dict {{layer: ffn}}, got {cfg.layer_ffn!r}")
    if cfg.arch == "moeut":
        _positive_int(moeut_group_size=cfg.moeut_group_size)
        if cfg.n_layers % cfg.moeut_group_size:
            raise ValueError(
                f"n_layers={cfg.n_layers} must be a multiple of moeut_group_size="
                f"{cfg.moeut_group_size} (the group is repeated n_layers / G times)"
            )
    if cfg.arch in ("transformer_xl", "decoder", "moeut"):
        _positive_int(n_heads=cfg.n_heads)
        if cfg.d_head is None and cfg.d_model % cfg.n_heads:
            raise ValueError(
                f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}; set d_head"
            )
        _positive_int(head_dim=cfg.head_dim)
    if cfg.arch == "smlp":
        _choice("smlp_routing", cfg.smlp_routing, SMLP_ROUTINGS)
        _positive_int(smlp_d_ff=cfg.smlp_d_ff, smlp_n_chunks=cfg.smlp_n_chunks)
        if cfg.smlp_d_ff % 2:
            raise ValueError(
                f"smlp_d_ff must be even (the gating unit halves it), got {cfg.smlp_d_ff}"
            )
        if cfg.d_model % cfg.smlp_n_chunks:
            raise ValueError(
                f"d_model={cfg.d_model} must split into smlp_n_chunks={cfg.smlp_n_chunks} "
                "equal chunks"
            )
        if not (
            isinstance(cfg.smlp_prefix_fraction, int | float) and 0 < cfg.smlp_prefix_fraction < 1
        ):
            raise ValueError(
                f"smlp_prefix_fraction must be in (0, 1), got {cfg.smlp_prefix_fraction!r}"
            )


def _check_layers(cfg: ModelConfig) -> None:
    if cfg.arch == "smlp":
        gmlp = [i for i in cfg.layer_ffn if not cfg.is_moe_layer(i)]
        if gmlp:
            raise ValueError(
                f"layer_ffn names sMLP blocks {gmlp}, which are gMLP blocks without an FFN "
                f"(moe_interval={cfg.moe_interval} places the sparse blocks)"
            )
    elif any(
        (not cfg.is_moe_layer(i) or cfg.moe_placement == "standalone") and i not in cfg.layer_ffn
        for i in range(cfg.n_layers)
    ):
        cfg.dense_ffn_config()


MODEL_FIELD_NAMES = [f.name for f in fields(ModelConfig)]


def parse_text(text: str, hint, key: str):
    """Read the command-line text `text` as a value of the type `hint` (of the field `key`)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if type(None) in options and text.strip().lower() in ("none", "null"):
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return parse_text(text, option, key)
            except ValueError:
                continue
        raise ValueError(f"{key}={text!r}: expected {_describe(hint)}")
    try:
        if hint is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if hint is str:
            return text
        return json.loads(text)
    except (ValueError, json.JSONDecodeError):
        raise ValueError(f"{key}={text!r}: expected {_describe(hint)}") from None


def _describe(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def field_hint(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _typed(cls, key: str, value, label: str):
    if isinstance(value, str) and field_hint(cls, key) is not str:
        hint = field_hint(cls, key)
        if hint is Any:
            return value
        return parse_text(value, hint, label)
    return value


def apply_overrides(cfg: ModelConfig, overrides: dict) -> ModelConfig:
    """A copy of `cfg` with `overrides` applied (and validated).

    Keys are ModelConfig fields; `ffn` takes a registered name (switching the layer type, keeping
    the options both types have), a dict of options or a layer config; options of the FFN are
    also given as "ffn.<option>" or, where the name is not a model field, bare (n_experts=8).
    String values (command-line text) are read as the type of the field they set.
    """
    model_kw, ffn_kw, attention_kw = {}, {}, {}
    for key, value in overrides.items():
        if key.startswith("ffn."):
            ffn_kw[key[4:]] = value
        elif key.startswith("attention."):
            attention_kw[key[len("attention.") :]] = value
        elif key in MODEL_FIELD_NAMES:
            model_kw[key] = value
        else:
            ffn_kw[key] = value
    for key in ("ffn", "layer_ffn", "attention"):
        if isinstance(model_kw.get(key), str) and model_kw[key].lstrip().startswith("{"):
            try:
                model_kw[key] = json.loads(model_kw[key])
            except json.JSONDecodeError as e:
                raise ValueError(f"{key}={model_kw[key]!r} is not valid JSON: {e}") from None
    typed = {
        k: v if k in ("ffn", "layer_ffn", "attention") else _typed(ModelConfig, k, v, k)
        for k, v in model_kw.items()
    }
    ffn_spec = typed.pop("ffn", None)
    layer_spec = typed.pop("layer_ffn", None)
    attention_spec = typed.pop("attention", None)
    if typed.get("arch", cfg.arch) != cfg.arch and cfg.attention is not None:
        # the old architecture's own attention does not follow it to another one
        if attention_name(cfg.attention) == DEFAULT_ATTENTION[cfg.arch]:
            typed["attention"] = None
    model = dataclasses.replace(cfg, **typed) if typed else cfg
    # FFN options that were the model's (d_ff, activation) follow it when it changes
    inherited = {k: typed[k] for k in MODEL_DEFAULTS if k in typed and typed[k] != getattr(cfg, k)}
    ffn = _follow(model.ffn, cfg, inherited)
    model = dataclasses.replace(
        model, layer_ffn={i: _follow(f, cfg, inherited) for i, f in model.layer_ffn.items()}
    )
    if ffn_spec is not None:
        ffn = ffn_config(ffn_spec, model, where="ffn", base=ffn)
    if ffn_kw:
        cls = type(ffn)
        names = {f.name for f in fields(cls)} - set(MODEL_FIELDS)
        unknown = sorted(set(ffn_kw) - names)
        if unknown:
            raise ValueError(
                f"unknown config override(s) {unknown}: not a model field "
                f"({', '.join(MODEL_FIELD_NAMES)}) nor an option of ffn ({ffn_name(ffn)}: "
                f"{', '.join(sorted(names))}; bare or as 'ffn.<option>')"
            )
        options = {k: _typed(cls, k, v, f"ffn.{k}") for k, v in ffn_kw.items()}
        ffn = ffn_config(options, model, where="ffn", base=ffn)
    layer_ffn = dict(model.layer_ffn)
    if layer_spec is not None:
        if not isinstance(layer_spec, dict):
            raise ValueError(f"layer_ffn must be a dict {{layer: ffn}}, got {layer_spec!r}")
        for i, spec in layer_spec.items():
            index = _layer_index(i, model.n_layers)
            base = model.layer_ffn_config(index)
            layer_ffn[index] = ffn_config(spec, model, where=f"layer_ffn[{index}]", base=base)
    model = dataclasses.replace(model, ffn=ffn, layer_ffn=layer_ffn)
    if attention_spec is None and not attention_kw:
        return model
    return dataclasses.replace(
        model, attention=_attention_override(model, attention_spec, attention_kw)
    )


def _attention_override(model: ModelConfig, spec, options: dict):
    if model.attention is None:
        raise ValueError(f"arch {model.arch!r} has no attention to set options of")
    attention = model.attention
    if spec is not None:
        attention = attention_config(spec, model, where="attention", base=attention)
    if options:
        cls = type(attention)
        names = {f.name for f in fields(cls)} - set(ATTENTION_MODEL_FIELDS)
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(
                f"unknown attention option(s) {unknown} of {attention_name(cls)}; valid: "
                f"{', '.join(sorted(names))} (as 'attention.<option>')"
            )
        typed = {k: _typed(cls, k, v, f"attention.{k}") for k, v in options.items()}
        attention = attention_config(typed, model, where="attention", base=attention)
    return attention


def _follow(config, old_model: ModelConfig, changed: dict):
    names = {f.name for f in fields(config)}
    update = {
        k: v
        for k, v in changed.items()
        if k in names and getattr(config, k) == getattr(old_model, k)
    }
    return dataclasses.replace(config, **update) if update else config


def ffn_to_dict(config) -> dict:
    """{"type": name, **options}: a layer config without the fields the model owns."""
    return {"type": ffn_name(config), **_options(config)}


def attention_to_dict(config) -> dict | None:
    """{"type": name, **options}: an attention config without the fields the model owns."""
    if config is None:
        return None
    return {"type": attention_name(config), **_options(config, ATTENTION_MODEL_FIELDS)}


def config_to_dict(cfg: ModelConfig) -> dict:
    """A JSON-safe dict of `cfg` (layer_ffn keys become strings)."""
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    d["ffn"] = ffn_to_dict(cfg.ffn)
    d["attention"] = attention_to_dict(cfg.attention)
    d["layer_ffn"] = {str(i): ffn_to_dict(v) for i, v in cfg.layer_ffn.items()}
    return d


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of `config_to_dict`; unknown keys raise ValueError."""
    if not isinstance(d, dict):
        raise ValueError(f"a model config must be a dict, got {type(d).__name__}")
    unknown = sorted(set(d) - set(MODEL_FIELD_NAMES))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid: {', '.join(MODEL_FIELD_NAMES)}")
    return ModelConfig(**d)
