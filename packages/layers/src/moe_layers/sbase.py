"""S-BASE (Clark et al. 2022) as the σ-MoE paper's baseline (`sinkmoid2` in the authors' code).

Training: a few Sinkhorn iterations (log space, no gradient) balance the gate logits across
experts; the balanced scores only pick the top-K experts, whose gates are sigmoid of the raw logits.
Inference: plain top-K on the logits, sigmoid gates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_layers.base import RoutedMoE, check_option, is_int
from moe_layers.sigma_moe import SigmoidRouterOptions, SigmoidTopKRouter, init_sigma_moe


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


class SinkhornRouter(SigmoidTopKRouter):
    """σ-MoE's router, but in training the experts are ranked by Sinkhorn-balanced scores."""

    def __init__(self, d_model: int, n_experts: int, k: int, *, sinkhorn_iters: int, **kwargs):
        super().__init__(d_model, n_experts, k, **kwargs)
        self.sinkhorn_iters = sinkhorn_iters

    def selection_scores(self, logits_TE: Tensor) -> Tensor:
        if self.training:
            return sinkhorn_log(logits_TE.detach(), self.sinkhorn_iters)
        return logits_TE.detach()


class SBaseMoE(RoutedMoE):
    """Sinkhorn-balanced top-K MoE FFN with sigmoid gates; sizes and options as SigmaMoE.

    sinkhorn_iters: Sinkhorn iterations in training (3 in the paper; 0 routes like σ-MoE).
    expert_dropout, entropy_weight ("entropy" aux loss), n_layers, activation, dropout, impl: as
    SigmaMoE (the paper runs S-BASE with σ-MoE's regularisers). Init: σ-MoE's dense-equivalent one.
    Parameters: experts.w1 [E, d_model, G], experts.w2 [E, G, d_model], router.gate [E, d_model].
    Ignores `token_ids`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(SigmoidRouterOptions):
        sinkhorn_iters: int = 3

        def __post_init__(self) -> None:
            super().__post_init__()
            check_option(self, ["sinkhorn_iters"], lambda v: is_int(v) and v >= 0, "an int >= 0")

    def build_router(self) -> SinkhornRouter:
        c = self.config
        return SinkhornRouter(
            c.d_model, c.n_experts, sinkhorn_iters=c.sinkhorn_iters, **c.router_options()
        )

    def reset_parameters(self) -> None:
        init_sigma_moe(self, self.config.n_layers)
