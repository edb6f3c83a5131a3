"""S-BASE (Clark et al. 2022) as the σ-MoE paper's baseline: σ-MoE's router with balanced selection.

Training: a few Sinkhorn-like iterations (log space, no gradient) balance the gate logits across
experts; the balanced scores only pick the top-K experts, whose gates are sigmoid of the raw logits.
Inference: plain top-K on the logits, sigmoid gates. Two balancings (`SBaseMoE`'s `balancing`):

- "sinkhorn": the textbook log-space Sinkhorn over all the tokens of a call (the σ-MoE authors'
  older `sinkmoid` mode, without its per-sequence option).
- "sinkmoid2": the authors' `sinkmoid2` mode, which their S-BASE runs used (RobertCsordas/moe,
  layers/moe_layer.py, `MoE.sinkhorn` with normalize=False): within each sequence, with duals
  a (per expert) and b (per token) updated from x - a and x - b, and scores exp(x + a + b).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_layers.base import RoutedMoE, check_choice, check_option, is_int
from moe_layers.sigma_moe import SigmoidRouterOptions, SigmoidTopKRouter, init_sigma_moe

BALANCINGS = ("sinkhorn", "sinkmoid2")


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


def sinkmoid2_scores(logits_NLE: Tensor, n_iters: int) -> Tensor:
    """The σ-MoE authors' `sinkmoid2` balancing of each of N sequences of L tokens, E experts.

    From a = 0 [N, E], b = 0 [N, L], each iteration sets
        b_l = log L - logsumexp_e(x_le - a_e),   then   a_e = log E - logsumexp_l(x_le - b_l),
    and the scores are exp(x + a + b) (not normalised). The duals enter with a minus sign, unlike
    the textbook Sinkhorn's (`sinkhorn_log`), so this is no Sinkhorn projection: the loads it
    gives are not equal (it may overshoot: when every token prefers one expert, most may go to the
    others), the duals grow with every iteration and the logits' scale, and the scores shrink; with large logits they
    underflow to 0 and the top-K among the ties is arbitrary, as in the authors' code. Within a
    token b is a constant, so the ranking is that of x + a; a one-token sequence (L = 1) gets one
    score for every expert after one iteration (a tie). In the logits' precision but at least
    float32 (the authors' AMP runs fed fp16 logits).
    """
    x_NLE = logits_NLE.to(torch.promote_types(logits_NLE.dtype, torch.float32))
    n_seq, length, n_experts = x_NLE.shape
    # log L as a tensor: math.log of the length would specialise a compiled graph to it
    log_length = torch.full((), length, dtype=x_NLE.dtype, device=x_NLE.device).log()
    a_NE = x_NLE.new_zeros(n_seq, n_experts)
    b_NL = x_NLE.new_zeros(n_seq, length)
    for _ in range(n_iters):
        b_NL = log_length - torch.logsumexp(x_NLE - a_NE[:, None, :], dim=-1)
        a_NE = math.log(n_experts) - torch.logsumexp(x_NLE - b_NL[:, :, None], dim=-2)
    return torch.exp(x_NLE + a_NE[:, None, :] + b_NL[:, :, None])


class SinkhornRouter(SigmoidTopKRouter):
    """σ-MoE's router, but in training the experts are ranked by balanced scores (`balancing`:
    "sinkhorn" over all tokens of the call, or "sinkmoid2" within each sequence of `seq_len`
    consecutive tokens)."""

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        k: int,
        *,
        sinkhorn_iters: int,
        balancing: str = "sinkhorn",
        **kwargs,
    ):
        super().__init__(d_model, n_experts, k, **kwargs)
        self.sinkhorn_iters, self.balancing = sinkhorn_iters, balancing

    def selection_scores(self, logits_TE: Tensor, seq_len: int | None = None) -> Tensor:
        logits_TE = logits_TE.detach()
        if not self.training:
            return logits_TE
        if self.balancing == "sinkhorn":
            return sinkhorn_log(logits_TE, self.sinkhorn_iters)
        n_tokens = logits_TE.shape[0]
        if n_tokens == 0:
            return logits_TE
        seq_len = n_tokens if seq_len is None else seq_len
        logits_NLE = logits_TE.reshape(n_tokens // seq_len, seq_len, self.n_experts)
        return sinkmoid2_scores(logits_NLE, self.sinkhorn_iters).reshape(n_tokens, -1)


class SBaseMoE(RoutedMoE):
    """Sinkhorn-balanced top-K MoE FFN with sigmoid gates; sizes and options as SigmaMoE.

    balancing: how training balances the selection (see the module docstring):
        "sinkhorn" (default): the textbook log-space Sinkhorn over all the tokens of the call (a
            batch's sequences together): the authors' older `sinkmoid`;
        "sinkmoid2": the authors' own update form, within each sequence: what the σ-MoE paper's
            S-BASE runs used (the `sbase-wt103-*` presets). The sequences are x's second-to-last
            dimension: x [..., L, d_model] holds prod(...) sequences of L tokens (x [d_model]: one
            token); a sequence's experts do not depend on the other sequences of the batch.
    sinkhorn_iters: balancing iterations in training (3 in the authors' runs; 0 routes like σ-MoE).
    expert_dropout, entropy_weight ("entropy" aux loss), n_layers, activation, dropout, impl: as
    SigmaMoE (the paper runs S-BASE with σ-MoE's regularisers). Init: σ-MoE's dense-equivalent one.
    Parameters: experts.w1 [E, d_model, G], experts.w2 [E, G, d_model], router.gate [E, d_model].
    Ignores `token_ids`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(SigmoidRouterOptions):
        sinkhorn_iters: int = 3
        balancing: str = "sinkhorn"

        def __post_init__(self) -> None:
            super().__post_init__()
            check_option(self, ["sinkhorn_iters"], lambda v: is_int(v) and v >= 0, "an int >= 0")
            check_choice(self, "balancing", BALANCINGS)

    def build_router(self) -> SinkhornRouter:
        c = self.config
        return SinkhornRouter(
            c.d_model,
            c.n_experts,
            sinkhorn_iters=c.sinkhorn_iters,
            balancing=c.balancing,
            **c.router_options(),
        )

    def reset_parameters(self) -> None:
        init_sigma_moe(self, self.config.n_layers)

    def forward_batch(self, x: Tensor, token_ids: Tensor | None) -> Tensor:
        # the router sees the sequences' length: sinkmoid2 balances within each
        seq_len = x.shape[-2] if x.dim() > 1 else 1
        x_TD = x.reshape(-1, x.shape[-1])
        ids_T = None if token_ids is None else token_ids.reshape(-1)
        routing = self.router(x_TD, ids_T, seq_len=seq_len)
        return self.apply_routing(x_TD, routing).reshape(x.shape)
