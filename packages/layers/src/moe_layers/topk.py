"""Top-K activation (Csordás et al. 2023, §3): a dense two-layer MLP keeping the K largest activations."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moe_layers.base import (
    ACTIVATIONS,
    IMPLS,
    LayerConfig,
    MoEModule,
    ParameterCount,
    check_at_most,
    check_bools,
    check_choice,
    check_probabilities,
    check_sizes,
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
    Ignores `token_ids`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(LayerConfig):
        positional = ("d_model", "d_ff", "k")
        d_ff: int
        k: int
        activation: str = "relu"
        dropout: float = 0.0
        n_layers: int = 1
        bias: bool = True
        impl: str = "fast"

        def __post_init__(self) -> None:
            super().__post_init__()
            check_sizes(self, "d_ff", "k", "n_layers")
            check_at_most(self, "k", self.d_ff, "d_ff")
            check_choice(self, "activation", ACTIVATIONS)
            check_probabilities(self, "dropout")
            check_bools(self, "bias")
            check_choice(self, "impl", IMPLS)

        def parameter_count(self) -> ParameterCount:
            biases = self.d_ff + self.d_model if self.bias else 0
            return ParameterCount(
                total=2 * self.d_ff * self.d_model + biases,
                active=(self.d_ff + self.k) * self.d_model + biases,
            )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        scale = math.sqrt(2.0 / c.n_layers)
        self.w1 = nn.Parameter(torch.randn(c.d_ff, c.d_model) * (scale / math.sqrt(c.d_model)))
        self.w2 = nn.Parameter(torch.randn(c.d_ff, c.d_model) * (scale / math.sqrt(c.d_ff)))
        self.b1 = nn.Parameter(torch.zeros(c.d_ff)) if c.bias else None
        self.b2 = nn.Parameter(torch.zeros(c.d_model)) if c.bias else None

    def forward_tokens(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Tensor:
        c = self.config
        fn = reference_topk_ffn if c.impl == "reference" else sparse_topk_ffn
        p = c.dropout if self.training else 0.0
        return fn(x_TD, self.w1, self.b1, self.w2, self.b2, c.k, c.activation, p)
