"""get_config and build: from a preset name or a config, with overrides, to a model."""

from __future__ import annotations

from torch import nn

from moe_models.config import ModelConfig, apply_overrides
from moe_models.presets import preset


def get_config(name_or_config: str | ModelConfig, **overrides) -> ModelConfig:
    """The config of a preset (or `name_or_config` itself) with `overrides` applied.

    Unknown preset names, unknown override keys and impossible sizes raise ValueError.
    """
    if isinstance(name_or_config, str):
        cfg = preset(name_or_config)
    elif isinstance(name_or_config, ModelConfig):
        cfg = name_or_config
    else:
        raise ValueError(
            f"expected a preset name or a ModelConfig, got {type(name_or_config).__name__}"
        )
    return apply_overrides(cfg, overrides) if overrides else cfg


def build(name_or_config: str | ModelConfig, **overrides) -> nn.Module:
    """The language model of `get_config(name_or_config, **overrides)`; it keeps it in `.config`."""
    cfg = get_config(name_or_config, **overrides)
    if cfg.arch == "transformer_xl":
        from moe_models.transformer_xl import TransformerXL

        return TransformerXL(cfg)
    if cfg.arch == "moeut":
        from moe_models.moeut import MoEUT

        return MoEUT(cfg)
    if cfg.arch == "decoder":
        from moe_models.decoder import DecoderLM

        return DecoderLM(cfg)
    from moe_models.smlp import SparseMLPLM

    return SparseMLPLM(cfg)
