"""Input checks shared by the routing and matmul entry points, run before any kernel.

check_idx looks only at types and shapes, so it needs no device read and traces under
torch.compile; check_idx_values looks at the ids, eagerly on the CPU and asynchronously on a device.
"""

import torch


def check_idx(idx_TK: torch.Tensor, n_experts: int, name: str = "idx") -> None:
    """ValueError naming `name` unless idx is an integer [T, K] tensor with K <= n_experts."""
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


def check_idx_values(
    idx_TK: torch.Tensor, n_experts: int, name: str = "idx", asynchronous: bool = False
) -> None:
    """Ids in [0, n_experts). Eager (a ValueError naming `name`) unless asynchronous: then one
    torch._assert_async, which fails on the device without the host waiting for it (on CUDA a
    device-side assert; on CPU tensors a RuntimeError)."""
    if idx_TK.numel() == 0:
        return
    if asynchronous:
        ok = ((idx_TK >= 0) & (idx_TK < n_experts)).all()
        torch._assert_async(ok, f"{name} holds expert ids outside [0, {n_experts})")
        return
    lo, hi = int(idx_TK.min()), int(idx_TK.max())
    if lo < 0 or hi >= n_experts:
        raise ValueError(
            f"{name} holds expert ids in [{lo}, {hi}], outside [0, {n_experts}) (E = {n_experts})"
        )
