"""moe_kernels: the expert matmul primitive of Mixture-of-Experts layers.

Public: expert_matmul, expert_mlp, sort_by_expert (and the references expert_matmul_naive,
expert_mlp_naive, sort_by_expert_naive that every fast path is tested against). Each runs one
custom op (moe_kernels::expert_matmul, ::expert_mlp, ::sort_by_expert; the expert ops with their
::*_backward ops), so torch.compile traces it whole; moe_kernels.testing records host reads.
"""

import importlib.metadata

import torch

from moe_kernels.expert_matmul.gathered import small_batch_path
from moe_kernels.expert_matmul.naive import expert_matmul_naive, expert_mlp_naive
from moe_kernels.expert_matmul.ops import expert_matmul_op, expert_mlp_op
from moe_kernels.expert_matmul.validate import check_matmul, check_mlp
from moe_kernels.routing import Routing, sort_by_expert, sort_by_expert_naive


def expert_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    idx: torch.Tensor,
    gates: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Row (t, k) = x[t] (or x[t, k]) @ w[idx[t, k]]: [T, K, d_out]; with gates [T, K] the
    gate-weighted sum over the K slots, [T, d_out]. Differentiable in x, w and gates.

    x [T, d_in] or [T, K, d_in]; w [E, d_in, d_out]; idx [T, K] integer in [0, E).
    backend: "auto" (Triton on CUDA, the torch backend on the CPU and for fp64), "torch" (its
    layout chosen by padding cost), "torch_grouped", "torch_padded", or "triton" (forces the
    kernels, e.g. on CPU tensors under TRITON_INTERPRET=1). Ids outside [0, E) raise ValueError
    on the CPU and fail a device-side assert on CUDA (the host never waits for the device).
    """
    check_matmul(x, w, idx, gates, backend)
    return expert_matmul_op(x, w, idx, gates, backend)[0]


def expert_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    idx: torch.Tensor,
    gates: torch.Tensor,
    activation: str = "relu",
    backend: str = "auto",
    *,
    w3: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_k gates[t, k] * act(x[t] @ w1[e]) @ w2[e] with e = idx[t, k]: [T, D] -> [T, D].

    w1 [E, D, G], w2 [E, G, D], idx and gates [T, K]; activation "relu", "gelu" (exact erf form),
    "silu", or the gated "swiglu": silu(x[t] @ w1[e]) * (x[t] @ w3[e]) in place of act(...),
    with w3 [E, D, G] (required for it, refused otherwise). Gates may hold zeros (dropped
    slots). backend as for expert_matmul, or a forward-only small-batch path: "gather" gathers the
    chosen experts' weights and runs one bmm per product (no host read), "chosen" (the CPU)
    reads the ids on the host and multiplies by each chosen expert's weights in place. "auto" and
    "torch" take one by themselves for few rows when no gradient is needed (decoding): "chosen"
    on the CPU (T * K <= 4 E), "gather" elsewhere (T * K <= E / 2).
    """
    check_mlp(x, w1, w2, idx, gates, activation, backend, w3)
    small_batch_op = small_batch_path(backend, x, idx, w1.shape[0], w1, w2, w3, gates)
    if small_batch_op is not None:
        return small_batch_op(x, w1, w2, w3, idx, gates, activation)
    return expert_mlp_op(x, w1, w2, w3, idx, gates, activation, backend)[0]


__version__ = importlib.metadata.version("moe-kernels")

__all__ = [
    "Routing",
    "expert_matmul",
    "expert_matmul_naive",
    "expert_mlp",
    "expert_mlp_naive",
    "sort_by_expert",
    "sort_by_expert_naive",
]
