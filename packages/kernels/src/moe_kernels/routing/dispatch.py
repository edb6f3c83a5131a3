"""sort_by_expert: the CuPy counting sort for CUDA tensors when CuPy is installed, else the torch one."""

import importlib.util

import torch

from moe_kernels.routing.naive import Routing, sort_by_expert_naive
from moe_kernels.routing.validate import check_idx

_HAS_CUPY = importlib.util.find_spec("cupy") is not None


def sort_by_expert(idx_TK: torch.Tensor, n_experts: int, backend: str = "auto") -> Routing:
    """Expert-sorted order, inverse permutation, offsets and counts of the rows of idx [T, K].

    backend: "auto" (CuPy on CUDA when installed, torch otherwise), "torch" or "cupy".
    """
    check_idx(idx_TK, n_experts)
    if backend not in ("auto", "torch", "cupy"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'cupy', got {backend!r}")
    use_cupy = backend == "cupy" or (backend == "auto" and _HAS_CUPY and idx_TK.is_cuda)
    if use_cupy:
        if not idx_TK.is_cuda:
            raise ValueError("backend='cupy' needs idx on a CUDA device")
        from moe_kernels.routing.cupy import sort_by_expert_cupy

        return sort_by_expert_cupy(idx_TK, n_experts)
    return sort_by_expert_naive(idx_TK, n_experts)
