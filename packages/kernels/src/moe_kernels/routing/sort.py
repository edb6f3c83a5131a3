"""The torch routing sort: the CPU path, and the CUDA path when CuPy is not installed.

Free of device-to-host reads, so that on CUDA it never waits for the device: counts by
scatter_add (bincount reads the largest id first), every size from the shape of idx, the inverse
permutation by a scatter rather than an index assignment.
"""

import torch

from moe_kernels.routing.naive import Routing


def sort_by_expert_torch(idx_TK: torch.Tensor, n_experts: int) -> Routing:
    """Same result as sort_by_expert_naive: a stable argsort of the flat ids, ties in row order."""
    device = idx_TK.device
    flat_N = idx_TK.reshape(-1).long()
    N = flat_N.numel()
    counts_E = torch.zeros(n_experts, dtype=torch.long, device=device)
    counts_E.scatter_add_(0, flat_N, torch.ones_like(flat_N))
    offsets_E1 = torch.zeros(n_experts + 1, dtype=torch.long, device=device)
    torch.cumsum(counts_E, 0, out=offsets_E1[1:])
    # 32-bit keys: a radix sort makes one pass per key byte, so half the passes of int64 ids
    order_N = torch.argsort(flat_N.to(torch.int32), stable=True)
    positions_N = torch.arange(N, device=device)
    inverse_N = torch.empty_like(order_N).scatter_(0, order_N, positions_N)
    return Routing(order_N, inverse_N, offsets_E1, counts_E)
