"""moe_models: Transformer-XL, fairseq-style MoE decoder and sparse all-MLP language models."""

import importlib.metadata

from moe_models.api import build, get_config
from moe_models.common import IGNORE_INDEX, LanguageModel, ModelOutput
from moe_models.config import (
    ModelConfig,
    attention_to_dict,
    config_from_dict,
    config_to_dict,
    ffn_to_dict,
)
from moe_models.generate import generate, stream
from moe_models.presets import Preset, preset_info, presets
from moe_models.registry import (
    attention_config_class,
    attention_name,
    ffn_config_class,
    ffn_name,
    register_attention,
    register_ffn,
    registered_attentions,
    registered_ffns,
)
from moe_models.saving import load_pretrained, save_pretrained
from moe_models.utils import count_parameters, dense_twin, flops_per_token

__version__ = importlib.metadata.version("moe-models")

__all__ = [
    "IGNORE_INDEX",
    "LanguageModel",
    "ModelConfig",
    "ModelOutput",
    "Preset",
    "attention_config_class",
    "attention_name",
    "attention_to_dict",
    "build",
    "config_from_dict",
    "config_to_dict",
    "count_parameters",
    "dense_twin",
    "ffn_config_class",
    "ffn_name",
    "ffn_to_dict",
    "flops_per_token",
    "generate",
    "get_config",
    "load_pretrained",
    "preset_info",
    "presets",
    "register_attention",
    "register_ffn",
    "registered_attentions",
    "registered_ffns",
    "save_pretrained",
    "stream",
]
