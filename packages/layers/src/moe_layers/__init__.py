"""moe_layers: Mixture-of-Experts and FFN-approximation layers for PyTorch."""

import importlib.metadata

from moe_layers.base import (
    Experts,
    ExpertsConfig,
    ExpertSizes,
    LayerConfig,
    MoEModule,
    ParameterCount,
    RoutedMoE,
    Router,
    Routing,
    RoutingStats,
    TopK,
    after_optimizer_step,
    collect_aux_losses,
    collect_layer_outputs,
    collect_routing_stats,
    records_routing_stats,
    without_routing_stats,
)
from moe_layers.base_layer import BaseLayer, balanced_assignment
from moe_layers.dense import DenseFFN
from moe_layers.gshard import GShardMoE
from moe_layers.hash_layer import HashLayer
from moe_layers.parallel import ShardedExperts, shard_experts, sharded_experts
from moe_layers.pkm import PKM
from moe_layers.router import TopKRouter
from moe_layers.sbase import SBaseMoE
from moe_layers.sigma_moe import SigmaMoE
from moe_layers.smlp import CausalSGU, SMoE, TMoE
from moe_layers.switch import SwitchMoE
from moe_layers.switchhead import SwitchHead
from moe_layers.token_choice import TokenChoiceMoE
from moe_layers.topk import TopKFFN

__version__ = importlib.metadata.version("moe-layers")

__all__ = [
    "BaseLayer",
    "CausalSGU",
    "DenseFFN",
    "ExpertSizes",
    "Experts",
    "ExpertsConfig",
    "GShardMoE",
    "HashLayer",
    "LayerConfig",
    "MoEModule",
    "PKM",
    "ParameterCount",
    "RoutedMoE",
    "Router",
    "Routing",
    "RoutingStats",
    "SBaseMoE",
    "SMoE",
    "ShardedExperts",
    "SigmaMoE",
    "SwitchHead",
    "SwitchMoE",
    "TMoE",
    "TokenChoiceMoE",
    "TopK",
    "TopKFFN",
    "TopKRouter",
    "after_optimizer_step",
    "balanced_assignment",
    "collect_aux_losses",
    "collect_layer_outputs",
    "collect_routing_stats",
    "records_routing_stats",
    "without_routing_stats",
    "shard_experts",
    "sharded_experts",
]
