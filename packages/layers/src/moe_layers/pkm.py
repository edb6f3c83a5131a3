"""Product-key memory (Lample et al. 2019) as configured in Csordás et al. 2023 (§3, PKM baseline).

No query projection: each head splits the (normalised) input into halves q1, q2, scores them against
its two sets of n_keys sub-keys, and keeps the knn best of the n_keys² sums s1[i] + s2[j]; the value
row i * n_keys + j is read with that score after an activation taken over all heads' selections
together (softmax in the original PKM, ReLU in the paper's variant). Values are shared by the heads.

The dense path (`selection="dense"`, or "auto" where the authors' code takes it) selects nothing:
the heads' full n_keys² score maps are summed, the activation runs over all n_keys² sums and every
value row is read with its weight. Every PKM run of the σ-MoE paper took it (knn = 128 >= n_keys).

Shapes: T tokens, H heads, N = n_keys, V = N² value rows, d = d_model // 2, K = knn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moe_layers.base import (
    IMPLS,
    LayerConfig,
    MoEModule,
    ParameterCount,
    check_at_most,
    check_choice,
    check_sizes,
    count_ids,
)

PKM_ACTIVATIONS = ("softmax", "relu")
VALUE_INITS = ("default", "dense")
SELECTIONS = ("topk", "dense", "auto")


def product_key_topk(q1_THd, q2_THd, keys_H2Nd, knn: int) -> tuple[Tensor, Tensor]:
    """Fast selection: top-knn of each sub-key set, then top-knn of the knn² candidate sums.

    Exact, since a pair in the overall top-knn has both halves in their own top-knn.
    Returns scores [T, H, knn] and value indices [T, H, knn].
    """
    n_keys = keys_H2Nd.shape[2]
    sub = min(knn, n_keys)
    s1_THN = torch.einsum("thd,hnd->thn", q1_THd, keys_H2Nd[:, 0])
    s2_THN = torch.einsum("thd,hnd->thn", q2_THd, keys_H2Nd[:, 1])
    v1, i1 = s1_THN.topk(sub, dim=-1)
    v2, i2 = s2_THN.topk(sub, dim=-1)
    cand_THSS = v1.unsqueeze(-1) + v2.unsqueeze(-2)
    scores_THK, flat = cand_THSS.flatten(-2).topk(knn, dim=-1)
    idx_THK = i1.gather(-1, flat // sub) * n_keys + i2.gather(-1, flat % sub)
    return scores_THK, idx_THK


def brute_force_topk(q1_THd, q2_THd, keys_H2Nd, knn: int) -> tuple[Tensor, Tensor]:
    """Readable reference selection: score all n_keys² pairs and take the top knn."""
    s1_THN = torch.einsum("thd,hnd->thn", q1_THd, keys_H2Nd[:, 0])
    s2_THN = torch.einsum("thd,hnd->thn", q2_THd, keys_H2Nd[:, 1])
    all_THNN = s1_THN.unsqueeze(-1) + s2_THN.unsqueeze(-2)  # row-major: value i * n_keys + j
    return all_THNN.flatten(-2).topk(knn, dim=-1)


def dense_product_key_scores(q1_Td, q2_Td, keys_H2Nd) -> Tensor:
    """Fast dense path: the heads' score maps summed, [T, V].

    sum_h (q1 . k1[h, i] + q2 . k2[h, j]) = q1 . (sum_h k1[h])_i + q2 . (sum_h k2[h])_j, so the
    sub-keys are summed over the heads first and only one N x N map is built.
    """
    s1_TN = q1_Td @ keys_H2Nd[:, 0].sum(0).t()
    s2_TN = q2_Td @ keys_H2Nd[:, 1].sum(0).t()
    return (s1_TN.unsqueeze(-1) + s2_TN.unsqueeze(-2)).flatten(-2)


def reference_dense_scores(x_TD, keys_H2Nd) -> Tensor:
    """Readable reference of the dense path's scores: each head's full key of value i * N + j is
    the concatenation [k1[h, i], k2[h, j]]; the scores x . key are added up over the heads."""
    n_heads, _, n_keys, _ = keys_H2Nd.shape
    i_V = torch.arange(n_keys, device=keys_H2Nd.device).repeat_interleave(n_keys)
    j_V = torch.arange(n_keys, device=keys_H2Nd.device).repeat(n_keys)
    scores_TV = x_TD.new_zeros(x_TD.shape[0], n_keys * n_keys)
    for h in range(n_heads):
        full_keys_VD = torch.cat([keys_H2Nd[h, 0, i_V], keys_H2Nd[h, 1, j_V]], dim=-1)
        scores_TV = scores_TV + x_TD @ full_keys_VD.t()
    return scores_TV


class PKM(MoEModule):
    """Product-key memory FFN replacement: y = sum over selected values v of act(score_v) * v.

    d_model: even (queries are split in halves).
    n_keys: sub-keys per half (n_keys² value rows of size d_model); n_heads; knn: values per head
        (knn <= n_keys²).
    selection: "topk" (default: each head reads its knn best values, the original PKM), "dense"
        (no selection: the sum over heads of each head's n_keys² map s1[i] + s2[j] is the score of
        value i * n_keys + j, the activation runs over all n_keys² scores and
        y = sum over all values of act(score) * value; about half the values are active under
        ReLU) or "auto" (dense when knn >= n_keys, as the σ-MoE authors' code decides:
        `no_knn = all(n_keys <= knn)`, so their knn = 128 runs with n_keys <= 89 are all dense).
        The dense path holds a [tokens, n_keys²] score map and reads every value row.
    activation: "softmax" (original PKM) or "relu" (the paper's variant), over all heads' scores
        (over all n_keys² summed scores on the dense path).
    n_layers: pre-LN init scale c = sqrt(2/n_layers); sub-keys ~ N(0, c²/d_model).
    value_init: "default" (values ~ N(0, c²/d_model)) or "dense" (N(0, c²/n_keys²), the
        dense-equivalent init, `pkm.custom_init=5` in the authors' code).
    impl: "fast" (product-key selection, bag lookup; dense: summed sub-keys, one matmul) or
        "reference" (all n_keys² scores, gather; dense: a loop over heads with full keys).
    Parameters: keys [n_heads, 2, n_keys, d_model // 2], values [n_keys², d_model].
    Routing statistics count how often each value row is read (on the dense path: for how many
    tokens its weight is nonzero). parameter_count().active: the keys and the values a token reads
    (n_heads * knn at most; all of them on the dense path, where any value may be active).
    Ignores `token_ids`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(LayerConfig):
        positional = ("d_model", "n_keys", "n_heads", "knn")
        n_keys: int
        n_heads: int = 4
        knn: int = 32
        selection: str = "topk"
        activation: str = "softmax"
        n_layers: int = 1
        value_init: str = "default"
        impl: str = "fast"

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.d_model % 2:
                raise ValueError(
                    f"d_model must be even (queries are split in halves), got {self.d_model}"
                )
            check_sizes(self, "n_keys", "n_heads", "knn", "n_layers")
            check_at_most(self, "knn", self.n_keys**2, "n_keys**2")
            check_choice(self, "selection", SELECTIONS)
            check_choice(self, "activation", PKM_ACTIVATIONS)
            check_choice(self, "value_init", VALUE_INITS)
            check_choice(self, "impl", IMPLS)

        @property
        def dense_path(self) -> bool:
            """Whether the layer takes the dense path (`selection`, "auto" resolved)."""
            return self.selection == "dense" or (
                self.selection == "auto" and self.knn >= self.n_keys
            )

        def parameter_count(self) -> ParameterCount:
            n_values = self.n_keys**2
            keys = self.n_heads * 2 * self.n_keys * (self.d_model // 2)
            read = n_values if self.dense_path else min(self.n_heads * self.knn, n_values)
            return ParameterCount(
                total=keys + n_values * self.d_model, active=keys + read * self.d_model
            )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        scale = math.sqrt(2.0 / c.n_layers)
        n_values = c.n_keys**2
        value_std = scale / math.sqrt(c.d_model if c.value_init == "default" else n_values)
        self.keys = nn.Parameter(
            torch.randn(c.n_heads, 2, c.n_keys, c.d_model // 2) * (scale / math.sqrt(c.d_model))
        )
        self.values = nn.Parameter(torch.randn(n_values, c.d_model) * value_std)

    def forward_tokens(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Tensor:
        c = self.config
        if c.dense_path:
            return self.forward_dense(x_TD)
        T, half = x_TD.shape[0], c.d_model // 2
        q1_THd = x_TD[:, None, :half].expand(T, c.n_heads, half)
        q2_THd = x_TD[:, None, half:].expand(T, c.n_heads, half)
        select = brute_force_topk if c.impl == "reference" else product_key_topk
        scores_THK, idx_THK = select(q1_THd, q2_THd, self.keys, c.knn)
        scores_TN = scores_THK.reshape(T, c.n_heads * c.knn)
        idx_TN = idx_THK.reshape(T, c.n_heads * c.knn)
        if c.activation == "softmax":
            weights_TN = torch.softmax(scores_TN, dim=-1)
        else:
            weights_TN = F.relu(scores_TN)
        self.record_routing_stats(count_ids(idx_TN, c.n_keys**2), n_tokens=T)
        if c.impl == "reference":
            return (weights_TN.unsqueeze(-1) * self.values[idx_TN]).sum(1)
        return F.embedding_bag(
            idx_TN, self.values, per_sample_weights=weights_TN.to(self.values.dtype), mode="sum"
        )

    def forward_dense(self, x_TD: Tensor) -> Tensor:
        c = self.config
        if c.impl == "reference":
            scores_TV = reference_dense_scores(x_TD, self.keys)
        else:
            half = c.d_model // 2
            scores_TV = dense_product_key_scores(x_TD[:, :half], x_TD[:, half:], self.keys)
        if c.activation == "softmax":
            weights_TV = torch.softmax(scores_TV, dim=-1)
        else:
            weights_TV = F.relu(scores_TV)
        self.record_routing_stats((weights_TV.detach() != 0).sum(0), n_tokens=x_TD.shape[0])
        if c.impl == "reference":
            return (weights_TV.unsqueeze(-1) * self.values).sum(1)
        return weights_TV.to(self.values.dtype) @ self.values
