"""The small-batch expert MLP (decoding, small batches), forward only, in two forms. Neither sorts
or does any work for the experts no token chose.

- "gather" (moe_kernels::expert_mlp_gathered, any device): the chosen experts' weights are
  gathered, one [D, G] matrix per (token, slot) row, and multiplied by one bmm per product. No
  device-to-host read, so on CUDA no synchronisation; but every decode step copies the chosen
  weights before reading them, which on the CPU costs more than the products.
- "chosen" (moe_kernels::expert_mlp_chosen, the CPU): the expert ids are read on the host (on the
  CPU that waits for nothing) and each chosen expert multiplies its tokens by its weights in place
  (views, no copy), so a step reads each chosen weight once, as a dense layer reads its own.

expert_mlp takes one of them when no gradient is needed and the rows are few
(SMALL_BATCH_ROWS_PER_EXPERT, CHOSEN_ROWS_PER_EXPERT): "chosen" on the CPU, "gather" elsewhere.
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
# On the CPU the chosen path runs while T * K <= E * CHOSEN_ROWS_PER_EXPERT. Measured on the same
# VM, 1 thread, thread CPU time, a whole decode step of sigma-moe-wt103-small (so with the weights
# streamed from memory as decoding meets them, not warm in cache as in a loop over one layer),
# interleaved medians, chosen / gather / sorted: batch 1 (N = E / 4) 16.7 / 18.1 / 20.7 ms,
# batch 8 (N = 2 E) 43.3 / 56.2 / 40.9 ms; tiny-sigma-moe batch 1 2.03 / 2.07 / 2.91 ms. Over one
# warm (16, 412, 128, 4) layer the chosen path led the sorted one up to T = 4 (N = E) and trailed
# it at T = 8; past N = E the per-expert loop's small products cost more than one sort.
CHOSEN_ROWS_PER_EXPERT = 1


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


def _chosen_body(
    x_TD: Tensor,
    w1_EDG: Tensor,
    w2_EGD: Tensor,
    w3_EDG: Tensor | None,
    idx_TK: Tensor,
    gates_TK: Tensor,
    activation: str,
) -> Tensor:
    T, K = idx_TK.shape
    E = w1_EDG.shape[0]
    out_TD = x_TD.new_zeros(T, x_TD.shape[1])
    ids_N = idx_TK.reshape(-1).tolist()
    if ids_N and (min(ids_N) < 0 or max(ids_N) >= E):
        check_idx_values(idx_TK, E)  # its error, the one the other paths give
    rows_of = {}
    for n, e in enumerate(ids_N):
        rows_of.setdefault(e, []).append(n)
    gates_N = gates_TK.reshape(-1)
    gate_of = gates_N.tolist()
    # R: the rows (token, slot) that chose expert e
    for e, rows in rows_of.items():
        if len(rows) == 1:
            # one row: a view of its token, and the gate scales the product in the BLAS call
            n = rows[0]
            token = n // K
            x_RD, out_RD = (
                (x_TD, out_TD) if T == 1 else (x_TD[token : token + 1], out_TD[token : token + 1])
            )
        else:
            tokens = torch.tensor([n // K for n in rows], device=x_TD.device)
            x_RD = x_TD.index_select(0, tokens)
        h_RG = torch.mm(x_RD, w1_EDG.select(0, e))
        if w3_EDG is None:
            a_RG = activate(activation, h_RG)
        else:
            a_RG = activate_gated(activation, h_RG, torch.mm(x_RD, w3_EDG.select(0, e)))
        if len(rows) == 1:
            out_RD.addmm_(a_RG, w2_EGD.select(0, e), alpha=gate_of[n])
        else:
            y_RD = torch.mm(a_RG, w2_EGD.select(0, e)).mul_(
                gates_N.index_select(0, torch.tensor(rows, device=x_TD.device))[:, None]
            )
            out_TD.index_add_(0, tokens, y_RD)
    return out_TD


expert_mlp_chosen_op = define("expert_mlp_chosen", _chosen_body)


@register_fake(expert_mlp_chosen_op)
def _(x_TD, w1_EDG, w2_EGD, w3_EDG, idx_TK, gates_TK, activation):
    return x_TD.new_empty(idx_TK.shape[0], x_TD.shape[1])


def small_batch_path(backend: str, x_TD: Tensor, idx_TK: Tensor, n_experts: int, *weights):
    """The small-batch op expert_mlp runs, or None: forced ('gather', 'chosen'), or under
    'auto'/'torch' for few rows when no gradient is needed ('chosen' on the CPU)."""
    if backend == "gather":
        return expert_mlp_gathered_op
    if backend == "chosen":
        return expert_mlp_chosen_op
    if backend not in ("auto", "torch"):
        return None
    tensors = (x_TD, *weights)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return None
    if x_TD.device.type == "cpu":
        if idx_TK.numel() <= CHOSEN_ROWS_PER_EXPERT * n_experts:
            return expert_mlp_chosen_op
        return None
    if idx_TK.numel() <= SMALL_BATCH_ROWS_PER_EXPERT * n_experts:
        return expert_mlp_gathered_op
    return None
