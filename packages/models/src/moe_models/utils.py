"""Parameter counts (total and active per token), forward FLOPs per token, and dense twins.

Counts are exact and need no memory for the model (so the 15B-parameter presets count too): see
`_total`. "Active" parameters are those a single token's output
depends on: all non-FFN parameters, and per FFN the router plus the experts a token is sent to
(K for σ-MoE / S-BASE, 1 for Switch / BASE / HASH, 2 for GShard), for PKM the keys plus the
selected value rows, for Top-K W1 plus the K selected rows of W2.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moe_models.config import FFNConfig, ModelConfig
from moe_models.ffn import build_ffn

EXPERTS_PER_TOKEN = {"switch": 1, "base": 1, "hash": 1, "gshard": 2}


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


def _smallest_valid_experts(f: FFNConfig) -> int:
    return max(2, f.k) if f.type in ("sigma_moe", "sbase") else 2


def _ffn_total(cfg: ModelConfig, layer: int) -> int:
    """Parameters of layer `layer`'s FFN, built on the CPU. A routed layer's count is linear in
    its expert count, so it is built with two small expert counts and extrapolated: the layers'
    initialisers use ops (norms, QR) whose meta versions are slow, and 512 real experts too big."""
    f = cfg.layer_ffn_config(layer)
    key = (repr(f), cfg.d_model, cfg.n_layers, cfg.vocab_size)
    if key not in _FFN_TOTALS:
        _FFN_TOTALS[key] = _count_ffn(cfg, layer, f)
    return _FFN_TOTALS[key]


_FFN_TOTALS: dict[tuple, int] = {}


def _count_ffn(cfg: ModelConfig, layer: int, f: FFNConfig) -> int:
    def count(ffn: FFNConfig) -> int:
        with torch.device("cpu"):
            return _n_params(build_ffn(dataclasses.replace(cfg, layer_ffn={layer: ffn}), layer))

    if f.n_experts and f.type not in ("dense", "topk", "pkm"):
        e1 = _smallest_valid_experts(f)
        if f.n_experts > e1 + 1:
            p1 = count(dataclasses.replace(f, n_experts=e1))
            p2 = count(dataclasses.replace(f, n_experts=e1 + 1))
            return p1 + (f.n_experts - e1) * (p2 - p1)
    return count(f)


def _skeleton(cfg: ModelConfig) -> tuple[ModelConfig, list[int]]:
    """`cfg` with a one-unit dense FFN in place of every non-dense FFN, and those layers."""
    swapped = [i for i in range(cfg.n_layers) if cfg.layer_ffn_config(i).type != "dense"]
    stand_in = FFNConfig(type="dense", d_ff=1)
    layer_ffn = {**cfg.layer_ffn, **dict.fromkeys(swapped, stand_in)}
    return dataclasses.replace(cfg, layer_ffn=layer_ffn), swapped


def _total(cfg: ModelConfig) -> int:
    """All parameters: the model built on the meta device with a one-unit dense FFN in place of
    each other FFN, plus those FFNs counted by `_ffn_total`."""
    from moe_models.api import build

    skeleton, swapped = _skeleton(cfg)
    total = _on_meta(lambda: _n_params(build(skeleton)))
    if swapped:
        total -= len(swapped) * _on_meta(lambda: _n_params(build_ffn(skeleton, swapped[0])))
    return total + sum(_ffn_total(cfg, i) for i in swapped)


def _ffn_active(f: FFNConfig, d_model: int, total: int) -> int:
    if f.type == "dense":
        return total
    if f.type == "topk":
        return total - (f.d_ff - f.k) * d_model
    if f.type == "pkm":
        n_values = f.pkm_keys**2
        return total - (n_values - min(f.pkm_heads * f.pkm_knn, n_values)) * d_model
    per_expert = 2 * d_model * f.expert_size
    k = EXPERTS_PER_TOKEN.get(f.type, f.k)
    return total - (f.n_experts - min(k, f.n_experts)) * per_expert


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
    active = total
    for i in range(cfg.n_layers):
        f = cfg.layer_ffn_config(i)
        if f.type != "dense":
            ffn_total = _ffn_total(cfg, i)
            active -= ffn_total - _ffn_active(f, cfg.d_model, ffn_total)
    return {"total": total, "active": active}


def _spatial_params(cfg: ModelConfig) -> int:
    """Parameters of the sMLP's [seq_len, seq_len] spatial projections (and their biases): a
    token uses one row of them per channel, so their FLOPs are counted by `_mixing_flops`."""
    from moe_models.api import build

    def count():
        return sum(
            p.numel()
            for name, p in build(_skeleton(cfg)[0]).named_parameters()
            if ".sgu.weight" in name or ".sgu.bias" in name or ".smoe." in name
        )

    return _on_meta(count)


def _mixing_flops(cfg: ModelConfig) -> int:
    """Token-mixing multiply-adds per token, over all layers, that no parameter count captures."""
    L = cfg.seq_len
    causal_ctx = (L + 1) / 2  # mean number of earlier-or-same positions a query sees
    if cfg.arch == "smlp":
        from moe_models.smlp import is_sparse_block

        widths = [
            cfg.d_model if is_sparse_block(cfg, i) else cfg.smlp_d_ff // 2
            for i in range(cfg.n_layers)
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
    lookups = cfg.vocab_size * cfg.d_model
    if cfg.arch == "decoder" and cfg.positions == "learned":
        lookups += cfg.seq_len * cfg.d_model
    head = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    if cfg.arch == "smlp":
        lookups += _spatial_params(cfg)
    return int(2 * (active - lookups + head) + 2 * _mixing_flops(cfg))


def _dense_size(params: int, d_model: int, bias: bool) -> int:
    """d_ff of the dense FFN (with or without biases) holding `params` parameters."""
    return max(1, round((params - (d_model if bias else 0)) / (2 * d_model + (1 if bias else 0))))


def dense_twin(config: ModelConfig, match: str = "params") -> ModelConfig:
    """The dense counterpart of a MoE config: each non-dense FFN becomes a dense FFN (with biases)
    holding as many parameters as it ("params") or as many active parameters per token
    ("compute"). Everything else is unchanged."""
    if match not in ("params", "compute"):
        raise ValueError(f"match must be 'params' or 'compute', got {match!r}")
    cfg = config
    twins: dict[int, FFNConfig] = {}
    for i in range(cfg.n_layers):
        f = cfg.layer_ffn_config(i)
        if f.type == "dense":
            continue
        total = _ffn_total(cfg, i)
        size = total if match == "params" else _ffn_active(f, cfg.d_model, total)
        twins[i] = FFNConfig(
            type="dense",
            d_ff=_dense_size(size, cfg.d_model, True),
            activation=f.activation,
            dropout=f.dropout,
            bias=True,
        )
    note = f"dense twin ({match}) of: {cfg.note}" if cfg.note else f"dense twin ({match})"
    if not twins:
        return dataclasses.replace(cfg, note=note)
    sizes = {t.d_ff for t in twins.values()}
    if not cfg.layer_ffn and cfg.moe_interval == 1 and len(sizes) == 1:
        return dataclasses.replace(cfg, ffn=next(iter(twins.values())), note=note)
    return dataclasses.replace(cfg, layer_ffn={**cfg.layer_ffn, **twins}, note=note)
