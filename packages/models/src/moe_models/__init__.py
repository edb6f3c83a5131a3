"""moe_models: Transformer-XL, fairseq-style MoE decoder and sparse all-MLP language models."""

from moe_models.api import build, get_config
from moe_models.common import IGNORE_INDEX, ModelOutput
from moe_models.config import FFNConfig, ModelConfig, config_from_dict, config_to_dict
from moe_models.generate import generate
from moe_models.presets import PAPER_SIZES, SIZE_TOLERANCE, presets
from moe_models.utils import count_parameters, dense_twin, flops_per_token

__all__ = [
    "IGNORE_INDEX",
    "PAPER_SIZES",
    "SIZE_TOLERANCE",
    "FFNConfig",
    "ModelConfig",
    "ModelOutput",
    "build",
    "count_parameters",
    "dense_twin",
    "flops_per_token",
    "generate",
    "config_from_dict",
    "config_to_dict",
    "get_config",
    "presets",
]
