"""Routing preparation: from expert ids [T, K] to the expert-sorted order of the (token, slot) rows."""

from moe_kernels.routing.dispatch import sort_by_expert
from moe_kernels.routing.naive import Routing, sort_by_expert_naive
from moe_kernels.routing.sort import sort_by_expert_torch

__all__ = ["Routing", "sort_by_expert", "sort_by_expert_naive", "sort_by_expert_torch"]
