"""Product-key memory (Lample et al. 2019) as configured in Csordás et al. 2023 (§3, PKM baseline).

No query projection: each head splits the (normalised) input into halves q1, q2, scores them against
its two sets of n_keys sub-keys, and keeps the knn best of the n_keys² sums s1[i] + s2[j]; the value
row i * n_keys + j is read with that score after an activation taken over all heads' selections
together (softmax in the original PKM, ReLU in the paper's variant). Values are shared by the heads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moe_layers.base import IMPLS, MoEModule, check_choice, check_positive

PKM_ACTIVATIONS = ("softmax", "relu")
VALUE_INITS = ("default", "dense")


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


class PKM(MoEModule):
    """Product-key memory FFN replacement: y = sum over selected values v of act(score_v) * v.

    n_keys: sub-keys per half (n_keys² value rows of size d_model); n_heads; knn: values per head
        (knn <= n_keys²).
    activation: "softmax" (original PKM) or "relu" (the paper's variant), over all heads' scores.
    n_layers: pre-LN init scale c = sqrt(2/n_layers); sub-keys ~ N(0, c²/d_model).
    value_init: "default" (values ~ N(0, c²/d_model)) or "dense" (N(0, c²/n_keys²), the
        dense-equivalent init, `pkm.custom_init=5` in the authors' code).
    impl: "fast" (product-key selection, bag lookup) or "reference" (all n_keys² scores, gather).
    Parameters: keys [n_heads, 2, n_keys, d_model // 2], values [n_keys², d_model].
    Routing statistics count how often each value row is read.
    """

    def __init__(
        self,
        d_model: int,
        n_keys: int,
        n_heads: int = 4,
        knn: int = 32,
        *,
        activation: str = "softmax",
        n_layers: int = 1,
        value_init: str = "default",
        impl: str = "fast",
    ) -> None:
        super().__init__()
        check_positive(d_model=d_model, n_keys=n_keys, n_heads=n_heads, knn=knn, n_layers=n_layers)
        if d_model % 2:
            raise ValueError(f"d_model must be even (queries are split in halves), got {d_model}")
        if knn > n_keys**2:
            raise ValueError(f"knn must be at most n_keys**2 ({n_keys**2}), got {knn}")
        check_choice("activation", activation, PKM_ACTIVATIONS)
        check_choice("value_init", value_init, VALUE_INITS)
        check_choice("impl", impl, IMPLS)
        self.d_model, self.n_keys, self.n_heads, self.knn = d_model, n_keys, n_heads, knn
        self.activation, self.impl = activation, impl
        c = math.sqrt(2.0 / n_layers)
        n_values = n_keys**2
        value_std = c / math.sqrt(d_model if value_init == "default" else n_values)
        self.keys = nn.Parameter(
            torch.randn(n_heads, 2, n_keys, d_model // 2) * (c / math.sqrt(d_model))
        )
        self.values = nn.Parameter(torch.randn(n_values, d_model) * value_std)

    def forward(self, x: Tensor) -> Tensor:
        self._start_forward()
        x_TD = x.reshape(-1, self.d_model)
        T, half = x_TD.shape[0], self.d_model // 2
        q1_THd = x_TD[:, None, :half].expand(T, self.n_heads, half)
        q2_THd = x_TD[:, None, half:].expand(T, self.n_heads, half)
        select = brute_force_topk if self.impl == "reference" else product_key_topk
        scores_THK, idx_THK = select(q1_THd, q2_THd, self.keys, self.knn)
        scores_TN = scores_THK.reshape(T, self.n_heads * self.knn)
        idx_TN = idx_THK.reshape(T, self.n_heads * self.knn)
        if self.activation == "softmax":
            weights_TN = torch.softmax(scores_TN, dim=-1)
        else:
            weights_TN = F.relu(scores_TN)
        self.record_routing_stats(
            torch.bincount(idx_TN.flatten(), minlength=self.n_keys**2), n_tokens=T
        )
        if self.impl == "reference":
            y_TD = (weights_TN.unsqueeze(-1) * self.values[idx_TN]).sum(1)
        else:
            y_TD = F.embedding_bag(
                idx_TN, self.values, per_sample_weights=weights_TN.to(self.values.dtype), mode="sum"
            )
        return y_TD.reshape(x.shape)
