"""The one registry from FFN type names to moe_layers layers.

Layers are looked up in moe_layers when a model is built, so a type whose layer moe_layers does not
provide fails with a clear error at build time rather than at import.
"""

from __future__ import annotations

from collections.abc import Callable

import moe_layers
from torch import nn

from moe_models.config import FFNConfig, ModelConfig


def layer_class(class_name: str, ffn_type: str):
    cls = getattr(moe_layers, class_name, None)
    if cls is None:
        raise ValueError(
            f"ffn type {ffn_type!r} needs moe_layers.{class_name}, which this moe_layers does not "
            f"provide (it exports {', '.join(sorted(moe_layers.__all__))})"
        )
    return cls


def _dense(f: FFNConfig, cfg: ModelConfig) -> nn.Module:
    return layer_class("DenseFFN", "dense")(
        cfg.d_model,
        f.d_ff,
        activation=f.activation,
        dropout=f.dropout,
        bias=f.bias,
        n_layers=cfg.n_layers,
    )


def _sigma_moe(f: FFNConfig, cfg: ModelConfig) -> nn.Module:
    return layer_class("SigmaMoE", "sigma_moe")(
        cfg.d_model,
        f.n_experts,
        f.expert_size,
        f.k,
        expert_dropout=f.expert_dropout,
        entropy_weight=f.entropy_weight,
        activation=f.activation,
        n_layers=cfg.n_layers,
        dropout=f.dropout,
        init=f.init,
        impl=f.impl,
    )


def _topk(f: FFNConfig, cfg: ModelConfig) -> nn.Module:
    return layer_class("TopKFFN", "topk")(
        cfg.d_model,
        f.d_ff,
        f.k,
        activation=f.activation,
        dropout=f.dropout,
        n_layers=cfg.n_layers,
        bias=f.bias,
        impl=f.impl,
    )


def _pkm(f: FFNConfig, cfg: ModelConfig) -> nn.Module:
    return layer_class("PKM", "pkm")(
        cfg.d_model,
        f.pkm_keys,
        f.pkm_heads,
        f.pkm_knn,
        activation=f.pkm_activation,
        n_layers=cfg.n_layers,
        value_init=f.pkm_value_init,
        impl=f.impl,
    )


def _switch(f: FFNConfig, cfg: ModelConfig) -> nn.Module:
    return layer_class("SwitchMoE", "switch")(
        cfg.d_model,
        f.n_experts,
        f.expert_size,
        capacity_factor=f.capacity_factor,
        load_balance_weight=f.load_balance_weight,
        balance_variant=f.balance_variant,
        init=f.init,
        n_layers=cfg.n_layers,
        activation=f.activation,
        dropout=f.dropout,
        impl=f.impl,
    )


def _sbase(f: FFNConfig, cfg: ModelConfig) -> nn.Module:
    return layer_class("SBaseMoE", "sbase")(
        cfg.d_model,
        f.n_experts,
        f.expert_size,
        f.k,
        sinkhorn_iters=f.sinkhorn_iters,
        expert_dropout=f.expert_dropout,
        entropy_weight=f.entropy_weight,
        n_layers=cfg.n_layers,
        activation=f.activation,
        dropout=f.dropout,
        impl=f.impl,
    )


def _gshard(f: FFNConfig, cfg: ModelConfig) -> nn.Module:
    return layer_class("GShardMoE", "gshard")(
        cfg.d_model,
        f.n_experts,
        f.expert_size,
        second_policy=f.second_policy,
        capacity_factor=1.0 if f.capacity_factor is None else f.capacity_factor,
        eval_capacity_factor=f.eval_capacity_factor,
        normalize_after_drop=f.normalize_after_drop,
        load_balance_weight=f.load_balance_weight,
        gate_noise=f.gate_noise,
        activation=f.activation,
        dropout=f.dropout,
        n_layers=cfg.n_layers,
        impl=f.impl,
    )


def _base(f: FFNConfig, cfg: ModelConfig) -> nn.Module:
    return layer_class("BaseLayer", "base")(
        cfg.d_model,
        f.n_experts,
        f.expert_size,
        activation=f.activation,
        dropout=f.dropout,
        n_layers=cfg.n_layers,
        impl=f.impl,
    )


def _hash(f: FFNConfig, cfg: ModelConfig) -> nn.Module:
    return layer_class("HashLayer", "hash")(
        cfg.d_model,
        f.n_experts,
        f.expert_size,
        vocab_size=cfg.vocab_size,
        seed=f.hash_seed,
        activation=f.activation,
        dropout=f.dropout,
        n_layers=cfg.n_layers,
        impl=f.impl,
    )


FFN_BUILDERS: dict[str, Callable[[FFNConfig, ModelConfig], nn.Module]] = {
    "dense": _dense,
    "sigma_moe": _sigma_moe,
    "topk": _topk,
    "pkm": _pkm,
    "switch": _switch,
    "sbase": _sbase,
    "gshard": _gshard,
    "base": _base,
    "hash": _hash,
}
# layers that route by the token id rather than the hidden state
TOKEN_ROUTED = {"hash"}


def build_ffn(cfg: ModelConfig, layer: int) -> nn.Module:
    """The FFN module of layer `layer` of the model `cfg`."""
    f = cfg.layer_ffn_config(layer)
    if f.type not in FFN_BUILDERS:
        raise ValueError(f"unknown ffn type {f.type!r}; expected one of {', '.join(FFN_BUILDERS)}")
    return FFN_BUILDERS[f.type](f, cfg)


class FFNBlock(nn.Module):
    """Pre-LN residual FFN block: x + Dropout(FFN(LN(x))), passing token ids to token-routed layers."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.ffn = build_ffn(cfg, layer)
        self.token_routed = cfg.layer_ffn_config(layer).type in TOKEN_ROUTED
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BLD, token_ids_BL=None):
        h = self.norm(x_BLD)
        y = self.ffn(h, token_ids=token_ids_BL) if self.token_routed else self.ffn(h)
        return x_BLD + self.dropout(y)
