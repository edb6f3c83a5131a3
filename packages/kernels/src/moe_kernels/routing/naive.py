"""Torch reference of the routing preparation: a stable sort of the flat (token, slot) rows by expert."""

from typing import NamedTuple

import torch


class Routing(NamedTuple):
    """The (token, slot) rows of idx [T, K], flattened to n = t * K + k, in expert-sorted order.

    order_N: sorted position -> flat row (rows of one expert keep their original order).
    inverse_N: flat row -> sorted position (order_N[inverse_N] == arange(N)).
    offsets_E1: [E + 1] int64 row offsets; expert e owns sorted rows offsets[e]:offsets[e + 1].
    counts_E: rows per expert.
    """

    order_N: torch.Tensor
    inverse_N: torch.Tensor
    offsets_E1: torch.Tensor
    counts_E: torch.Tensor


def sort_by_expert_naive(idx_TK: torch.Tensor, n_experts: int) -> Routing:
    """Counts by bincount, order by a stable argsort (deterministic: ties keep flat-row order)."""
    flat_N = idx_TK.reshape(-1).long()
    counts_E = torch.bincount(flat_N, minlength=n_experts)
    offsets_E1 = torch.zeros(n_experts + 1, dtype=torch.long, device=flat_N.device)
    torch.cumsum(counts_E, 0, out=offsets_E1[1:])
    order_N = torch.argsort(flat_N, stable=True)
    inverse_N = torch.empty_like(order_N)
    inverse_N[order_N] = torch.arange(order_N.numel(), device=flat_N.device)
    return Routing(order_N, inverse_N, offsets_E1, counts_E)
