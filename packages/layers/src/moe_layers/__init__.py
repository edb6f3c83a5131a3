"""moe_layers: Mixture-of-Experts and FFN-approximation layers for PyTorch."""

from moe_layers.base import (
    MoEModule,
    RoutedExperts,
    RoutingStats,
    collect_aux_losses,
    collect_routing_stats,
)
from moe_layers.dense import DenseFFN
from moe_layers.pkm import PKM
from moe_layers.sbase import SBaseMoE
from moe_layers.sigma_moe import SigmaMoE
from moe_layers.switch import SwitchMoE
from moe_layers.topk import TopKFFN

__all__ = [
    "DenseFFN",
    "MoEModule",
    "PKM",
    "RoutedExperts",
    "RoutingStats",
    "SBaseMoE",
    "SigmaMoE",
    "SwitchMoE",
    "TopKFFN",
    "collect_aux_losses",
    "collect_routing_stats",
]
