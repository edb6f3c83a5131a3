"""moe_kernels: the expert matmul primitive of Mixture-of-Experts layers."""

import torch.nn.functional as F

from moe_kernels.expert_matmul.naive import expert_matmul_naive

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def expert_matmul(x, w, idx, gates=None):
    return expert_matmul_naive(x, w, idx, gates)


def expert_mlp(x, w1, w2, idx, gates, activation="relu"):
    h_TKG = _ACTIVATIONS[activation](expert_matmul(x, w1, idx))
    return expert_matmul(h_TKG, w2, idx, gates)


__all__ = ["expert_matmul", "expert_mlp"]
