"""moe_layers: Mixture-of-Experts and FFN-approximation layers for PyTorch."""

from moe_layers.base import (
    MoEModule,
    RoutedExperts,
    RoutingStats,
    collect_aux_losses,
    collect_routing_stats,
)
from moe_layers.dense import DenseFFN

__all__ = [
    "DenseFFN",
    "MoEModule",
    "RoutedExperts",
    "RoutingStats",
    "collect_aux_losses",
    "collect_routing_stats",
]
