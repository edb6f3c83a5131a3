"""The small-batch expert MLP (decoding, small batches): the weights of the chosen experts are
gathered, one [D, G] matrix per (token, slot) row, and multiplied by one bmm per product. No sort,
no work for the experts no token chose, no device-to-host read (so on CUDA no synchronisation).

Forward only (moe_kernels::expert_mlp_gathered has no autograd): expert_mlp takes it when no
gradient is needed and the rows are few (SMALL_BATCH_ROWS_PER_EXPERT). Copying N = T * K weight
matrices costs more than the sorted path's fixed overheads once N nears E.
"""

import torch
from torch import Tensor

from moe_kernels.expert_matmul.activations import activate, activate_gated
from moe_kernels.library import define, register_fake
from moe_kernels.routing.validate import check_idx_values

# The gather path runs while T * K <= E * SMALL_BATCH_ROWS_PER_EXPERT. Measured on the 2-core
# development VM (loaded: other processes shared the cores), fp32, 1 thread, forward medians of
# expert_mlp against this path, (E, D, G, K) = (16, 412, 128, 4) (sigma-moe-wt103-small):
# T = 1: 0.32 vs 0.16 ms, T = 2: 0.45 vs 0.38 ms, T = 4: 0.63 vs 0.88 ms; (64, 256, 32, 8): the
# gather path faster up to T = 8 (N = 64 = E), (8, 128, 512, 2) up to T = 2 (N = 4 = E / 2). So
# the crossover sits between N = E / 2 and N = E; E / 2 keeps the path where it always won.
SMALL_BATCH_ROWS_PER_EXPERT = 0.5


def _gathered_body(
    x_TD: Tensor,
    w1_EDG: Tensor,
    w2_EGD: Tensor,
    w3_EDG: Tensor | None,
    idx_TK: Tensor,
    gates_TK: Tensor,
    activation: str,
) -> Tensor:
    T, K = idx_TK.shape
    D = x_TD.shape[1]
    check_idx_values(idx_TK, w1_EDG.shape[0], asynchronous=idx_TK.is_cuda)
    flat_N = idx_TK.reshape(-1)
    x_N1D = x_TD.unsqueeze(1).expand(T, K, D).reshape(T * K, 1, D)
    h_N1G = torch.bmm(x_N1D, w1_EDG.index_select(0, flat_N))
    if w3_EDG is None:
        a_N1G = activate(activation, h_N1G)
    else:
        a_N1G = activate_gated(activation, h_N1G, torch.bmm(x_N1D, w3_EDG.index_select(0, flat_N)))
    y_TKD = torch.bmm(a_N1G, w2_EGD.index_select(0, flat_N)).view(T, K, D)
    return torch.bmm(gates_TK.unsqueeze(1), y_TKD).view(T, D)  # the gate-weighted slot sum


expert_mlp_gathered_op = define("expert_mlp_gathered", _gathered_body)


@register_fake(expert_mlp_gathered_op)
def _(x_TD, w1_EDG, w2_EGD, w3_EDG, idx_TK, gates_TK, activation):
    return x_TD.new_empty(idx_TK.shape[0], x_TD.shape[1])


def takes_gathered(backend: str, idx_TK: Tensor, n_experts: int, *tensors) -> bool:
    """Whether expert_mlp runs this path: forced ('gather'), or under 'auto'/'torch' for few rows
    when no gradient is needed."""
    if backend == "gather":
        return True
    if backend not in ("auto", "torch"):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return idx_TK.numel() <= SMALL_BATCH_ROWS_PER_EXPERT * n_experts
