"""sort_by_expert: the custom op moe_kernels::sort_by_expert over the CuPy counting sort (CUDA
tensors, when CuPy is installed) or the torch sort."""

import importlib.util

import torch

from moe_kernels.library import define, register_fake
from moe_kernels.routing.naive import Routing
from moe_kernels.routing.sort import sort_by_expert_torch
from moe_kernels.routing.validate import check_idx, check_idx_values

_HAS_CUPY = importlib.util.find_spec("cupy") is not None
SORT_BACKENDS = ("auto", "torch", "cupy")


def sort_routing(idx_TK: torch.Tensor, n_experts: int, backend: str = "auto") -> Routing:
    """The sort itself, without checks: the expert ops call it on ids they have checked."""
    if backend == "cupy" or (backend == "auto" and _HAS_CUPY and idx_TK.is_cuda):
        from moe_kernels.routing.cupy import sort_by_expert_cupy

        return sort_by_expert_cupy(idx_TK, n_experts)
    return sort_by_expert_torch(idx_TK, n_experts)


def _sort_body(
    idx_TK: torch.Tensor, n_experts: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_idx_values(idx_TK, n_experts, asynchronous=idx_TK.is_cuda)
    return tuple(sort_routing(idx_TK, n_experts, backend))


sort_by_expert_op = define("sort_by_expert", _sort_body)


@register_fake(sort_by_expert_op)
def _(idx_TK, n_experts, backend):
    N = idx_TK.numel()
    like = dict(dtype=torch.long, device=idx_TK.device)
    return (
        torch.empty(N, **like),
        torch.empty(N, **like),
        torch.empty(n_experts + 1, **like),
        torch.empty(n_experts, **like),
    )


def sort_by_expert(idx_TK: torch.Tensor, n_experts: int, backend: str = "auto") -> Routing:
    """Expert-sorted order, inverse permutation, offsets and counts of the rows of idx [T, K].

    backend: "auto" (CuPy on CUDA when installed, torch otherwise), "torch" or "cupy". Ids outside
    [0, n_experts) raise ValueError on the CPU; on CUDA they fail a device-side assert, so that
    the host never waits for the device.
    """
    check_idx(idx_TK, n_experts)
    if backend not in SORT_BACKENDS:
        raise ValueError(f"backend must be 'auto', 'torch' or 'cupy', got {backend!r}")
    if backend == "cupy" and not idx_TK.is_cuda:
        raise ValueError("backend='cupy' needs idx on a CUDA device")
    return Routing(*sort_by_expert_op(idx_TK, n_experts, backend))
