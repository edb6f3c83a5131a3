"""Parameter counts (total and active per token), forward FLOPs per token, and dense twins.

Counts are exact and need no memory for the model (so the 15B-parameter presets count too): the
model is built on the meta device with stand-ins for its FFNs, whose counts come from each layer
config's `parameter_count()`. "Active" parameters are those a single token's output depends on:
all non-FFN parameters, and per FFN what its `parameter_count().active` says (the router plus the
experts a token is sent to, for PKM the keys plus the selected values, ...), standalone MoE
blocks (`moe_placement="standalone"`) included.
"""

from __future__ import annotations

import dataclasses

import torch
from moe_layers import ParameterCount
from torch import nn
from torch.overrides import TorchFunctionMode

from moe_models.config import ModelConfig
from moe_models.ffn import FFNBlock
from moe_models.registry import ffn_config_class


def _n_params(module: nn.Module) -> int:
    # a tied parameter is one parameter: parameters() yields each tensor once
    return sum(p.numel() for p in module.parameters())


class _SkipInPlace(TorchFunctionMode):
    """Makes in-place ops (the nn.init functions, fill_, mul_, ...) on meta tensors no-ops: they
    have no values to change, and torch's meta versions of the random ones import torch._dynamo,
    which takes many seconds."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            # nn.init passes the tensor by keyword, Tensor methods positionally
            first = args[0] if args else kwargs.get("tensor")
            if isinstance(first, torch.Tensor) and first.is_meta:
                return first
        return func(*args, **kwargs)


def _on_meta(fn):
    with torch.device("meta"), _SkipInPlace():
        return fn()


def _ffn_layers(cfg: ModelConfig) -> list[int]:
    """Layers that hold an FFN (every layer, except the sMLP's gMLP blocks)."""
    if cfg.arch == "moeut":
        return list(range(cfg.moeut_group_size))  # the shared layers, once
    return [i for i in range(cfg.n_layers) if cfg.arch != "smlp" or cfg.is_moe_layer(i)]


def _ffn_counts(cfg: ModelConfig, i: int) -> ParameterCount:
    return _layer_counts(cfg.layer_ffn_config(i))


def _standalone_counts(cfg: ModelConfig) -> list[ParameterCount]:
    configs = [cfg.standalone_config(i) for i in range(cfg.n_layers)]
    return [_layer_counts(f) for f in configs if f is not None]


def _layer_counts(f) -> ParameterCount:
    counter = getattr(f, "parameter_count", None)
    if counter is not None:
        return counter()
    # a user's layer without an analytic count: count its parameters, all of them active
    total = _on_meta(lambda: _n_params(f.build()))
    return ParameterCount(total=total, active=total)


def _attention_counts(cfg: ModelConfig) -> list[ParameterCount]:
    """The counts of the distinct attention layers (MoEUT's shared ones once) that count their
    active parameters (a routed attention such as SwitchHead); the others are all active."""
    counter = getattr(cfg.attention, "parameter_count", None)
    if counter is None:
        return []
    return [counter()] * distinct_layers(cfg)


def distinct_layers(cfg: ModelConfig) -> int:
    """How many layers have weights of their own (MoEUT shares G layers across the depth)."""
    return cfg.n_layers if cfg.arch != "moeut" else cfg.moeut_group_size


def _total(cfg: ModelConfig) -> int:
    """All parameters: the model built on the meta device with a one-unit dense FFN in every
    FFN layer (a 512-expert layer is big and slow to initialise even there) and no standalone
    blocks, those stand-ins' parameters taken out and each layer's own analytic count put in."""
    skeleton = _skeleton(cfg)
    total = _n_params(skeleton)
    total -= sum(_n_params(m.ffn) for m in skeleton.modules() if isinstance(m, FFNBlock))
    total += sum(_ffn_counts(cfg, i).total for i in _ffn_layers(cfg))
    return total + sum(c.total for c in _standalone_counts(cfg))


def _skeleton(cfg: ModelConfig) -> nn.Module:
    """The model of `cfg` on the meta device with a one-unit dense FFN in every FFN layer and
    without standalone MoE blocks."""
    from moe_models.api import build

    stand_in = {"type": "dense", "d_ff": 1}
    layer_ffn = dict.fromkeys(_ffn_layers(cfg), stand_in)
    skeleton = dataclasses.replace(cfg, layer_ffn=layer_ffn, moe_placement="ffn")
    return _on_meta(lambda: build(skeleton))


def _as_config(model_or_config) -> ModelConfig:
    if isinstance(model_or_config, ModelConfig):
        return model_or_config
    cfg = getattr(model_or_config, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise ValueError("expected a ModelConfig or a model built by moe_models.build")
    return cfg


def count_parameters(model_or_config) -> dict[str, int]:
    """{"total": every parameter, "active": parameters used per token} (tied ones counted once)."""
    cfg = _as_config(model_or_config)
    total = _n_params(model_or_config) if isinstance(model_or_config, nn.Module) else _total(cfg)
    counts = [_ffn_counts(cfg, i) for i in _ffn_layers(cfg)] + _standalone_counts(cfg)
    counts += _attention_counts(cfg)
    inactive = sum(c.total - c.active for c in counts)
    return {"total": total, "active": total - inactive}


def _spatial_params(cfg: ModelConfig) -> int:
    """Parameters of the sMLP's [seq_len, seq_len] spatial projections (and their biases): a
    token uses one row of them per channel, so their FLOPs are counted by `_mixing_flops`."""
    return sum(
        p.numel()
        for name, p in _skeleton(cfg).named_parameters()
        if ".sgu.weight" in name or ".sgu.bias" in name or ".smoe." in name
    )


def _mixing_flops(cfg: ModelConfig) -> int:
    """Token-mixing multiply-adds per token, over all layers, that no parameter count captures."""
    L = cfg.seq_len
    causal_ctx = (L + 1) / 2  # mean number of earlier-or-same positions a query sees
    if cfg.arch == "smlp":
        widths = [
            cfg.d_model if cfg.is_moe_layer(i) else cfg.smlp_d_ff // 2 for i in range(cfg.n_layers)
        ]
        return int(sum(widths) * causal_ctx)
    inner = cfg.n_heads * cfg.head_dim
    if cfg.arch == "decoder":
        return int(cfg.n_layers * 2 * inner * causal_ctx)  # q·k and attention-weighted v
    M = cfg.memory_length
    K = M + L
    # q·k and weighted v over memory + causal context, q·r over all K distances, and W_r applied
    # to the K distance embeddings once per segment
    per_layer = 2 * inner * (M + causal_ctx) + inner * K + cfg.d_model * inner * K / L
    return int(cfg.n_layers * per_layer)


def flops_per_token(model_or_config) -> int:
    """Forward FLOPs per token at the config's seq_len (2 per multiply-add): every active
    parameter matrix once, the output projection included and embedding look-ups excluded, plus
    attention's (or the spatial gating's) token mixing. Biases and LayerNorm parameters count
    like matrix entries (a negligible overcount); softmax and activations are left out."""
    cfg = _as_config(model_or_config)
    active = count_parameters(cfg)["active"]
    if cfg.arch == "moeut":
        # each token passes the shared layers n_layers / G times
        repeats = cfg.n_layers // cfg.moeut_group_size
        shared = sum(
            p.numel() for name, p in _skeleton(cfg).named_parameters() if name.startswith("layers.")
        )
        stand_ins = sum(
            _n_params(m.ffn) for m in _skeleton(cfg).modules() if isinstance(m, FFNBlock)
        )
        layer_active = (
            shared - stand_ins + sum(_ffn_counts(cfg, i).active for i in _ffn_layers(cfg))
        )
        layer_active -= sum(c.total - c.active for c in _attention_counts(cfg))
        active += (repeats - 1) * layer_active
    lookups = cfg.vocab_size * cfg.d_model
    if cfg.arch == "decoder" and cfg.positions == "learned":
        lookups += cfg.seq_len * cfg.d_model
    head = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    if cfg.arch == "smlp":
        lookups += _spatial_params(cfg)
    return int(2 * (active - lookups + head) + 2 * _mixing_flops(cfg))


def _dense_size(params: int, d_model: int, bias: bool, glu: bool = False) -> int:
    """d_ff of the dense FFN (with or without biases; a GLU has three matrices) holding `params`
    parameters."""
    matrices = 3 if glu else 2
    per_unit = matrices * d_model + (matrices - 1 if bias else 0)
    return max(1, round((params - (d_model if bias else 0)) / per_unit))


def dense_twin(config: ModelConfig, match: str = "params") -> ModelConfig:
    """The dense counterpart of a MoE config: each FFN that is not dense becomes a dense FFN
    (with biases; SwiGLU where the layer's activation is) holding as many parameters as it ("params") or as many active parameters per
    token ("compute"); a layer's standalone MoE block is taken out and its parameters added to
    that layer's dense FFN. Everything else is unchanged."""
    if match not in ("params", "compute"):
        raise ValueError(f"match must be 'params' or 'compute', got {match!r}")
    cfg = config
    routed = [c for c in _attention_counts(cfg) if c.active < c.total]
    if routed or cfg.arch == "moeut":
        raise ValueError(
            f"dense_twin replaces FFNs only; this {cfg.arch} model's attention "
            f"({type(cfg.attention).__name__}) is routed or its layers shared: compare it "
            "against its *-dense preset (e.g. tiny-switchhead-dense, tiny-moeut-dense)"
        )
    dense_cls = ffn_config_class("dense")
    twins = {}
    for i in _ffn_layers(cfg):
        f, extra = cfg.layer_ffn_config(i), cfg.standalone_config(i)
        if isinstance(f, dense_cls) and extra is None:
            continue
        counts = [_ffn_counts(cfg, i)] + ([] if extra is None else [_layer_counts(extra)])
        size = sum(c.total if match == "params" else c.active for c in counts)
        activation = getattr(f, "activation", cfg.activation)
        twins[i] = {
            "type": "dense",
            "d_ff": _dense_size(size, cfg.d_model, True, activation == "swiglu"),
            "activation": activation,
            "dropout": getattr(f, "dropout", 0.0),
        }
    if not twins:
        return cfg
    cfg = dataclasses.replace(cfg, moe_placement="ffn")
    sizes = {t["d_ff"] for t in twins.values()}
    every_layer = all(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    if not cfg.layer_ffn and every_layer and len(sizes) == 1:
        twin = next(iter(twins.values()))
        return dataclasses.replace(cfg, d_ff=twin["d_ff"], ffn=twin)
    return dataclasses.replace(cfg, layer_ffn={**cfg.layer_ffn, **twins})
