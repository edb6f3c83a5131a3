"""Top-K activation (Csordás et al. 2023, §3): a dense two-layer MLP keeping the K largest activations."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moe_layers.base import (
    ACTIVATIONS,
    IMPLS,
    MoEModule,
    check_choice,
    check_positive,
    check_probability,
)


def reference_topk_ffn(x_TD, w1_FD, b1_F, w2_FD, b2_D, k: int, activation: str, dropout: float):
    """Readable reference: compute every hidden unit, zero all but the k largest, dense second matmul.

    The k-th largest value per token is the threshold (ties at it are measure-zero for continuous
    inputs, and ties at 0 contribute nothing).
    """
    h_TF = F.dropout(ACTIVATIONS[activation](F.linear(x_TD, w1_FD, b1_F)), dropout)
    kth_T1 = h_TF.sort(dim=-1, descending=True).values[:, k - 1 : k]
    return F.linear(h_TF * (h_TF >= kth_T1), w2_FD.t(), b2_D)


def sparse_topk_ffn(x_TD, w1_FD, b1_F, w2_FD, b2_D, k: int, activation: str, dropout: float):
    """Fast path: the second matmul only reads the k selected rows of w2 (a weighted bag of rows)."""
    h_TF = F.dropout(ACTIVATIONS[activation](F.linear(x_TD, w1_FD, b1_F)), dropout)
    vals_TK, idx_TK = h_TF.topk(k, dim=-1, sorted=False)
    y_TD = F.embedding_bag(idx_TK, w2_FD, per_sample_weights=vals_TK.to(w2_FD.dtype), mode="sum")
    return y_TD if b2_D is None else y_TD + b2_D


class TopKFFN(MoEModule):
    """Top-K activation FFN: y = W2 topk_K(act(W1 x + b1)) + b2, all other hidden units zeroed.

    d_ff: hidden width; k: hidden units kept per token (k <= d_ff).
    dropout: on the hidden activations, before the top-K (as in the authors' code).
    n_layers: for the pre-LN init, std sqrt(2/n_layers)/sqrt(fan_in) for both matrices (as DenseFFN).
    impl: "fast" (topk + weighted bag of w2 rows, K*d_model work per token for the second matmul)
        or "reference" (mask below the k-th largest, dense second matmul).
    The authors' code can also rank units by h_i * ||W2[:, i]||; their sweeps rank by h_i, as here.
    Parameters: w1 [d_ff, d_model], b1 [d_ff], w2 [d_ff, d_model] (row i is unit i's output), b2.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        k: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        n_layers: int = 1,
        bias: bool = True,
        impl: str = "fast",
    ) -> None:
        super().__init__()
        check_positive(d_model=d_model, d_ff=d_ff, k=k, n_layers=n_layers)
        if k > d_ff:
            raise ValueError(f"k must be at most d_ff ({d_ff}), got {k}")
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("impl", impl, IMPLS)
        check_probability(dropout=dropout)
        self.d_model, self.d_ff, self.k = d_model, d_ff, k
        self.activation, self.dropout, self.impl = activation, dropout, impl
        c = math.sqrt(2.0 / n_layers)
        self.w1 = nn.Parameter(torch.randn(d_ff, d_model) * (c / math.sqrt(d_model)))
        self.w2 = nn.Parameter(torch.randn(d_ff, d_model) * (c / math.sqrt(d_ff)))
        self.b1 = nn.Parameter(torch.zeros(d_ff)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        self._start_forward()
        x_TD = x.reshape(-1, self.d_model)
        fn = reference_topk_ffn if self.impl == "reference" else sparse_topk_ffn
        p = self.dropout if self.training else 0.0
        y_TD = fn(x_TD, self.w1, self.b1, self.w2, self.b2, self.k, self.activation, p)
        return y_TD.reshape(x.shape)
