"""Plain PyTorch reference for the expert matmul: sort (token, slot) rows by expert, loop over experts.

Readable rather than fast; autograd differentiates it. Every fast path is tested against it.
"""

import torch
import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def expert_matmul_naive(x, w, idx, gates=None):
    """x [T, d_in] or [T, K, d_in]; w [E, d_in, d_out]; idx [T, K]; gates [T, K] or None.

    Returns [T, K, d_out] (row (t, k) = x[t(, k)] @ w[idx[t, k]]), or with gates
    [T, d_out] = sum_k gates[t, k] * row (t, k).
    """
    T, K = idx.shape
    E, d_in, d_out = w.shape
    x_TKD = x.unsqueeze(1).expand(T, K, d_in) if x.dim() == 2 else x
    rows_ND = x_TKD.reshape(T * K, d_in)
    flat_idx = idx.reshape(-1).long()
    order = torch.argsort(flat_idx, stable=True)
    out_ND = rows_ND.new_zeros(T * K, d_out)
    counts = torch.bincount(flat_idx, minlength=E).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n:
            sel = order[start : start + n]
            out_ND = out_ND.index_copy(0, sel, rows_ND[sel] @ w[e])
        start += n
    y_TKD = out_ND.view(T, K, d_out)
    if gates is None:
        return y_TKD
    return (gates.unsqueeze(-1).to(y_TKD.dtype) * y_TKD).sum(1)


def expert_mlp_naive(x_TD, w1_EDG, w2_EGD, idx_TK, gates_TK, activation="relu", w3_EDG=None):
    """Two expert matmuls with the activation between: [T, d] -> [T, d]. activation "swiglu"
    multiplies silu(x W1) by a third expert matmul, x W3 (w3_EDG [E, D, G])."""
    if activation == "swiglu":
        gate_TKG = F.silu(expert_matmul_naive(x_TD, w1_EDG, idx_TK))
        h_TKG = gate_TKG * expert_matmul_naive(x_TD, w3_EDG, idx_TK)
    else:
        h_TKG = ACTIVATIONS[activation](expert_matmul_naive(x_TD, w1_EDG, idx_TK))
    return expert_matmul_naive(h_TKG, w2_EGD, idx_TK, gates_TK)
