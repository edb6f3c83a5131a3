"""Routing preparation: from expert ids [T, K] to the expert-sorted order of the (token, slot) rows."""

from moe_kernels.routing.dispatch import sort_by_expert
from moe_kernels.routing.naive import Routing, sort_by_expert_naive

__all__ = ["Routing", "sort_by_expert", "sort_by_expert_naive"]
