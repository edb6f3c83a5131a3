"""S-BASE (Clark et al. 2022) as the σ-MoE paper's baseline (`sinkmoid2` in the authors' code).

Training: a few Sinkhorn iterations (log space, no gradient) balance the gate logits across
experts; the balanced scores only pick the top-K experts, whose gates are sigmoid of the raw logits.
Inference: plain top-K on the logits, sigmoid gates.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_layers.base import RoutedExperts, check_positive, check_probability
from moe_layers.sigma_moe import init_sigma_moe, negative_batch_entropy, sigmoid_topk


def sinkhorn_log(logits_TE: Tensor, n_iters: int) -> Tensor:
    """Log of a Sinkhorn-balanced assignment matrix from scores exp(logits).

    Each iteration first gives every expert the same total mass over the tokens, then normalises
    every token's row to sum to 1; at convergence each expert receives T / E of the mass.
    """
    log_p_TE = logits_TE.float()
    for _ in range(n_iters):
        log_p_TE = log_p_TE - torch.logsumexp(log_p_TE, dim=0, keepdim=True)
        log_p_TE = log_p_TE - torch.logsumexp(log_p_TE, dim=1, keepdim=True)
    return log_p_TE


class SBaseMoE(RoutedExperts):
    """Sinkhorn-balanced top-K MoE FFN with sigmoid gates; sizes and options as SigmaMoE.

    sinkhorn_iters: Sinkhorn iterations in training (3 in the paper; 0 routes like σ-MoE).
    expert_dropout, entropy_weight ("entropy" aux loss), n_layers, activation, dropout, impl: as
    SigmaMoE (the paper runs S-BASE with σ-MoE's regularisers). Init: σ-MoE's dense-equivalent one.
    Parameters: w1 [E, d_model, G], w2 [E, G, d_model], gate [E, d_model].
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        expert_size: int,
        k: int,
        *,
        sinkhorn_iters: int = 3,
        expert_dropout: float = 0.0,
        entropy_weight: float = 0.0,
        n_layers: int = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        impl: str = "fast",
    ) -> None:
        check_positive(k=k, n_layers=n_layers)
        if k > n_experts:
            raise ValueError(f"k must be at most n_experts ({n_experts}), got {k}")
        if not (isinstance(sinkhorn_iters, int) and sinkhorn_iters >= 0):
            raise ValueError(f"sinkhorn_iters must be a non-negative int, got {sinkhorn_iters!r}")
        check_probability(expert_dropout=expert_dropout)
        if not entropy_weight >= 0:
            raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight!r}")
        super().__init__(d_model, n_experts, expert_size, activation, impl, hidden_dropout=dropout)
        self.k, self.sinkhorn_iters = k, sinkhorn_iters
        self.expert_dropout, self.entropy_weight = expert_dropout, entropy_weight
        self.gate = nn.Parameter(torch.empty(n_experts, d_model))
        init_sigma_moe(self, n_layers)

    def forward(self, x: Tensor) -> Tensor:
        self._start_forward()
        x_TD = x.reshape(-1, self.d_model)
        logits_TE = x_TD @ self.gate.t()
        scores_TE, drop_TE = logits_TE.detach(), None
        if self.training:
            scores_TE = sinkhorn_log(scores_TE, self.sinkhorn_iters)
            if self.expert_dropout > 0:
                drop_TE = torch.rand_like(scores_TE) < self.expert_dropout
        idx_TK, gates_TK, counts_E = sigmoid_topk(scores_TE, logits_TE, self.k, drop_TE)
        if self.training and self.entropy_weight > 0 and x_TD.shape[0] > 0:
            self.record_aux_loss("entropy", self.entropy_weight * negative_batch_entropy(logits_TE))
        self.record_routing_stats(
            counts_E,
            n_tokens=x_TD.shape[0],
            probs_TE=torch.softmax(logits_TE.detach().float(), dim=-1),
        )
        return self.expert_forward(x_TD, idx_TK, gates_TK).reshape(x.shape)
