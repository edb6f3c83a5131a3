"""Input checks shared by the routing and matmul entry points, run before any kernel."""

import torch


def check_idx(idx_TK: torch.Tensor, n_experts: int, name: str = "idx") -> None:
    """ValueError naming `name` unless idx is an integer [T, K] tensor with ids in [0, n_experts)."""
    if not isinstance(idx_TK, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(idx_TK).__name__}")
    if idx_TK.dtype.is_floating_point or idx_TK.dtype.is_complex or idx_TK.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {idx_TK.dtype}")
    if idx_TK.dim() != 2:
        raise ValueError(f"{name} must be 2-D [T, K], got shape {tuple(idx_TK.shape)}")
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
    if idx_TK.shape[1] > n_experts:
        raise ValueError(
            f"{name} has K = {idx_TK.shape[1]} slots but there are only {n_experts} experts (K > E)"
        )
    if idx_TK.numel():
        lo, hi = int(idx_TK.min()), int(idx_TK.max())
        if lo < 0 or hi >= n_experts:
            raise ValueError(
                f"{name} holds expert ids in [{lo}, {hi}], outside [0, {n_experts}) (E = {n_experts})"
            )
