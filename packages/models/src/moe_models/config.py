"""Model configurations as dataclasses, their validation, overrides and JSON round trip.

A `ModelConfig` describes one language model; its `ffn` field (an `FFNConfig`) the feed-forward
block of its layers. `layer_ffn` replaces that block in chosen layers, so layers may differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

ARCHS = ("transformer_xl", "decoder", "smlp")
FFN_TYPES = ("dense", "sigma_moe", "topk", "pkm", "switch", "sbase", "gshard", "base", "hash")
POSITIONS = ("sinusoidal", "learned")


@dataclass
class FFNConfig:
    """The feed-forward block of a layer; `type` picks the moe_layers layer, the rest its options.

    `d_ff` is the hidden size of the dense FFN (and of Top-K). MoE presets keep it at the size of
    their parameter-equal dense twin, so overriding `ffn="dense"` gives that twin. Options a layer
    type does not use are ignored by it.
    """

    type: str = "dense"
    d_ff: int = 0
    n_experts: int = 0
    expert_size: int = 0
    k: int = 1
    activation: str = "relu"
    dropout: float = 0.0
    bias: bool = True
    impl: str = "fast"
    # σ-MoE / S-BASE regularisation
    expert_dropout: float = 0.0
    entropy_weight: float = 0.0
    sinkhorn_iters: int = 3
    # σ-MoE / Switch expert init: "dense" (W2 as a dense layer of width E*G) or "expert_size"
    init: str = "dense"
    # Switch / GShard
    balance_variant: str = "switch"
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    load_balance_weight: float = 0.01
    second_policy: str = "sampling"
    normalize_after_drop: bool = True
    gate_noise: float = 0.0
    # PKM
    pkm_keys: int = 0
    pkm_heads: int = 4
    pkm_knn: int = 32
    pkm_activation: str = "softmax"
    pkm_value_init: str = "default"
    # HASH
    hash_seed: int = 0


@dataclass
class ModelConfig:
    """One language model.

    arch: "transformer_xl" (relative positions, segment memory, pre-LN), "decoder" (pre-LN
        Transformer with absolute positions, fairseq style) or "smlp" (sparse all-MLP).
    seq_len: the training segment length (the XL unroll T; the decoder's and sMLP's context).
    mem_len: Transformer-XL memory length (None: seq_len, i.e. one previous segment).
    moe_interval: layer i uses `ffn` when (i + 1) % moe_interval == 0 and a dense FFN of size
        `ffn.d_ff` otherwise (fairseq's moe_freq); 1 puts `ffn` in every layer. In the sMLP model it
        places the sparse blocks instead; 0 there gives the dense gMLP baseline.
    layer_ffn: {layer index: FFNConfig} overriding the block of single layers.
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
    tie_embeddings: bool = False
    positions: str = "sinusoidal"
    scale_embeddings: bool = False
    ffn: FFNConfig = field(default_factory=FFNConfig)
    moe_interval: int = 1
    layer_ffn: dict[int, FFNConfig] = field(default_factory=dict)
    # sMLP: gMLP hidden size, sMoE experts (chunks of d_model), sMoE routing and its prefix share
    smlp_d_ff: int = 0
    smlp_n_chunks: int = 4
    smlp_routing: str = "deterministic"
    smlp_prefix_fraction: float = 0.2
    note: str = ""

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def memory_length(self) -> int:
        return self.seq_len if self.mem_len is None else self.mem_len

    def layer_ffn_config(self, i: int) -> FFNConfig:
        """The FFN of layer i, after `moe_interval` and `layer_ffn`."""
        if i in self.layer_ffn:
            return self.layer_ffn[i]
        if self.moe_interval >= 1 and (i + 1) % self.moe_interval == 0:
            return self.ffn
        return dataclasses.replace(
            FFNConfig(),
            type="dense",
            d_ff=self.ffn.d_ff,
            bias=self.ffn.bias,
            activation=self.ffn.activation,
            dropout=self.ffn.dropout,
        )


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(
            f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}"
        )


def _positive(**values) -> None:
    for name, value in values.items():
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _probability(**values) -> None:
    for name, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def validate_ffn(f: FFNConfig, d_model: int, where: str = "ffn") -> None:
    _choice(f"{where}.type", f.type, FFN_TYPES)
    _probability(**{f"{where}.dropout": f.dropout, f"{where}.expert_dropout": f.expert_dropout})
    if f.type in ("dense", "topk"):
        _positive(**{f"{where}.d_ff": f.d_ff})
    if f.type == "topk" and not 1 <= f.k <= f.d_ff:
        raise ValueError(f"{where}.k must be in [1, d_ff={f.d_ff}] for Top-K, got {f.k}")
    if f.type in ("sigma_moe", "switch", "sbase", "gshard", "base", "hash"):
        _positive(**{f"{where}.n_experts": f.n_experts, f"{where}.expert_size": f.expert_size})
    if f.type in ("sigma_moe", "sbase") and not 1 <= f.k <= f.n_experts:
        raise ValueError(f"{where}.k must be in [1, n_experts={f.n_experts}], got {f.k}")
    if f.type == "gshard" and f.n_experts < 2:
        raise ValueError(
            f"{where}.n_experts must be at least 2 for top-2 GShard, got {f.n_experts}"
        )
    if f.type == "pkm":
        _positive(**{f"{where}.pkm_keys": f.pkm_keys, f"{where}.pkm_heads": f.pkm_heads})
        if not 1 <= f.pkm_knn <= f.pkm_keys**2:
            raise ValueError(f"{where}.pkm_knn must be in [1, pkm_keys**2], got {f.pkm_knn}")
        if d_model % 2:
            raise ValueError(f"PKM splits the query in halves: d_model must be even, got {d_model}")


def validate(cfg: ModelConfig) -> ModelConfig:
    """Raise ValueError naming the first impossible option of `cfg`; return it unchanged otherwise."""
    _choice("arch", cfg.arch, ARCHS)
    _choice("positions", cfg.positions, POSITIONS)
    _positive(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, seq_len=cfg.seq_len
    )
    _probability(dropout=cfg.dropout, attn_dropout=cfg.attn_dropout)
    if cfg.moe_interval < 0:
        raise ValueError(f"moe_interval must be >= 0, got {cfg.moe_interval}")
    if cfg.arch in ("transformer_xl", "decoder"):
        _positive(n_heads=cfg.n_heads, head_dim=cfg.head_dim)
        if cfg.d_head is None and cfg.d_model % cfg.n_heads:
            raise ValueError(
                f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}; set d_head"
            )
    if cfg.mem_len is not None and cfg.mem_len < 0:
        raise ValueError(f"mem_len must be >= 0, got {cfg.mem_len}")
    for i in cfg.layer_ffn:
        if not (isinstance(i, int) and 0 <= i < cfg.n_layers):
            raise ValueError(
                f"layer_ffn names layer {i!r}, but the model has layers 0..{cfg.n_layers - 1}"
            )
    if cfg.arch == "smlp":
        _choice("smlp_routing", cfg.smlp_routing, ("deterministic", "learned"))
        _positive(smlp_d_ff=cfg.smlp_d_ff, smlp_n_chunks=cfg.smlp_n_chunks)
        if cfg.smlp_d_ff % 2:
            raise ValueError(
                f"smlp_d_ff must be even (the gating unit halves it), got {cfg.smlp_d_ff}"
            )
        if cfg.d_model % cfg.smlp_n_chunks:
            raise ValueError(
                f"d_model={cfg.d_model} must split into smlp_n_chunks={cfg.smlp_n_chunks} equal chunks"
            )
        dense_blocks = [
            i for i in cfg.layer_ffn if not (cfg.moe_interval and (i + 1) % cfg.moe_interval == 0)
        ]
        if dense_blocks:
            raise ValueError(
                f"layer_ffn names sMLP blocks {dense_blocks}, which are gMLP blocks without an FFN "
                f"(moe_interval={cfg.moe_interval} places the sparse blocks)"
            )
        if not 0.0 < cfg.smlp_prefix_fraction < 1.0:
            raise ValueError(
                f"smlp_prefix_fraction must be in (0, 1), got {cfg.smlp_prefix_fraction}"
            )
    for i in range(cfg.n_layers):
        if cfg.arch == "smlp" and not (cfg.moe_interval and (i + 1) % cfg.moe_interval == 0):
            continue  # a dense sMLP block is a gMLP block without an FFN
        where = f"layer_ffn[{i}]" if i in cfg.layer_ffn else "ffn"
        validate_ffn(cfg.layer_ffn_config(i), cfg.d_model, where)
    return cfg


_MODEL_FIELDS = [f.name for f in fields(ModelConfig)]
_FFN_FIELDS = [f.name for f in fields(FFNConfig)]


def _ffn_from(value, base: FFNConfig) -> FFNConfig:
    if isinstance(value, FFNConfig):
        return value
    if isinstance(value, str):
        return dataclasses.replace(base, type=value)
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(_FFN_FIELDS))
        if unknown:
            raise ValueError(f"unknown FFN option(s) {unknown}; valid: {', '.join(_FFN_FIELDS)}")
        return dataclasses.replace(base, **value)
    raise ValueError(
        f"ffn must be an FFN type name, a dict of FFN options or an FFNConfig, got {value!r}"
    )


def apply_overrides(cfg: ModelConfig, overrides: dict) -> ModelConfig:
    """A copy of `cfg` with `overrides` applied, then validated.

    Keys are ModelConfig fields; `ffn` takes a type name (switching the FFN type, keeping the
    sizes), a dict of FFN options or an FFNConfig; FFN options may also be given as "ffn.<option>"
    or, where the name is not a model field, bare (e.g. n_experts=8).
    """
    model_kw, ffn_kw = {}, {}
    for key, value in overrides.items():
        if key.startswith("ffn.") and key[4:] in _FFN_FIELDS:
            ffn_kw[key[4:]] = value
        elif key in _MODEL_FIELDS:
            model_kw[key] = value
        elif key in _FFN_FIELDS:
            ffn_kw[key] = value
        else:
            raise ValueError(
                f"unknown config override {key!r}; valid: {', '.join(_MODEL_FIELDS)}, "
                f"and the FFN options {', '.join(_FFN_FIELDS)} (bare or as 'ffn.<option>')"
            )
    ffn = _ffn_from(model_kw.pop("ffn"), cfg.ffn) if "ffn" in model_kw else cfg.ffn
    if ffn_kw:
        ffn = dataclasses.replace(ffn, **ffn_kw)
    if "layer_ffn" in model_kw:
        model_kw["layer_ffn"] = {
            int(i): _ffn_from(v, FFNConfig()) for i, v in model_kw["layer_ffn"].items()
        }
    return validate(dataclasses.replace(cfg, ffn=ffn, **model_kw))


def config_to_dict(cfg: ModelConfig) -> dict:
    """A JSON-safe dict of `cfg` (layer_ffn keys become strings)."""
    d = dataclasses.asdict(cfg)
    d["layer_ffn"] = {str(i): v for i, v in d["layer_ffn"].items()}
    return d


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of `config_to_dict`; unknown keys raise ValueError."""
    d = dict(d)
    unknown = sorted(set(d) - set(_MODEL_FIELDS))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid: {', '.join(_MODEL_FIELDS)}")
    ffn = _ffn_from(d.pop("ffn", {}), FFNConfig())
    layer_ffn = {int(i): _ffn_from(v, FFNConfig()) for i, v in d.pop("layer_ffn", {}).items()}
    return validate(ModelConfig(**d, ffn=ffn, layer_ffn=layer_ffn))
