"""Argument checks of expert_matmul and expert_mlp: ValueError naming the argument, before any kernel.

Only types, shapes, dtypes and devices, so that the checks read nothing from the device and trace
under torch.compile; the ids themselves are checked inside the ops (routing.validate).
"""

import torch

from moe_kernels.expert_matmul.activations import ACTIVATIONS, GATED_ACTIVATIONS
from moe_kernels.expert_matmul.ops import BACKENDS, HAS_TRITON, MLP_BACKENDS
from moe_kernels.routing.validate import check_idx

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name: str, t, dims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")


def _same_kind(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def check_matmul(x, w, idx, gates, backend, backends=BACKENDS) -> None:
    _tensor("w", w, (3,))
    _tensor("x", x, (2, 3))
    if w.dtype not in _FLOATS:
        raise ValueError(f"w must be fp16, bf16, fp32 or fp64, got {w.dtype}")
    _same_kind("x", x, "w", w)
    check_idx(idx, w.shape[0])
    if idx.device != w.device:
        raise ValueError(f"idx is on {idx.device} but w is on {w.device}")
    T, K = idx.shape
    if K < 1:
        raise ValueError(f"idx must have at least one slot (K >= 1), got shape {tuple(idx.shape)}")
    want_x = (T, w.shape[1]) if x.dim() == 2 else (T, K, w.shape[1])
    if tuple(x.shape) != want_x:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but idx {tuple(idx.shape)} and w {tuple(w.shape)} "
            f"need {want_x} ([T, d_in] or [T, K, d_in])"
        )
    if gates is not None:
        _tensor("gates", gates, (2,))
        if tuple(gates.shape) != (T, K):
            raise ValueError(f"gates has shape {tuple(gates.shape)}, expected idx's {(T, K)}")
        _same_kind("gates", gates, "x", x)
    if backend not in backends:
        raise ValueError(f"backend must be one of {backends}, got {backend!r}")
    if backend == "triton" and not HAS_TRITON:
        raise ValueError("backend='triton' needs Triton: pip install 'moe-kernels[triton]'")


def check_mlp(x, w1, w2, idx, gates, activation, backend, w3=None) -> None:
    _tensor("x", x, (2,))
    _tensor("w1", w1, (3,))
    _tensor("w2", w2, (3,))
    check_matmul(x, w1, idx, gates, backend, MLP_BACKENDS)
    _same_kind("w2", w2, "w1", w1)
    E, D, G = w1.shape
    if tuple(w2.shape) != (E, G, D):
        raise ValueError(f"w2 has shape {tuple(w2.shape)}; w1 {tuple(w1.shape)} needs {(E, G, D)}")
    if gates is None:
        raise ValueError("gates must be a [T, K] tensor for expert_mlp, got None")
    if activation not in ACTIVATIONS + GATED_ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {ACTIVATIONS + GATED_ACTIVATIONS}, got {activation!r}"
        )
    if activation in GATED_ACTIVATIONS and w3 is None:
        raise ValueError(f"w3 [E, D, G] is required for the gated activation {activation!r}")
    if activation not in GATED_ACTIVATIONS and w3 is not None:
        raise ValueError(
            f"w3 is only for gated activations {GATED_ACTIVATIONS}, not {activation!r}"
        )
    if backend in ("gather", "chosen") and torch.is_grad_enabled():
        for name, t in (("x", x), ("w1", w1), ("w2", w2), ("w3", w3), ("gates", gates)):
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"backend {backend!r} is forward-only, but {name} requires grad "
                    "(run it under torch.no_grad())"
                )
    if w3 is not None:
        _tensor("w3", w3, (3,))
        _same_kind("w3", w3, "w1", w1)
        if w3.shape != w1.shape:
            raise ValueError(f"w3 has shape {tuple(w3.shape)}, expected w1's {tuple(w1.shape)}")
