"""The general token-choice router of today's MoE models (Mixtral, OLMoE, Qwen-MoE, DeepSeek-V3).

Shapes: T tokens, D = d_model, E experts, K experts per token, N groups of E / N experts.

Each token scores the E experts from logits x @ gate.T ("softmax" or "sigmoid" scores), picks K of
them (optionally only among the experts of its best `topk_groups` groups, DeepSeek-V3's
group-limited routing, and with an expert bias added for the choice only), and weights them by
their scores (optionally renormalised over the K chosen, times `route_scale`).

Aux-loss-free balancing (Wang et al. 2024; DeepSeek-V3): the bias b_E is a persistent buffer,
added to the scores for the choice of experts and never to the gates, with no gradient. In
training each forward adds its per-expert counts to a running load (a plain tensor, not a
buffer: DDP broadcasts buffers from rank 0, which would overwrite the other ranks' counts); after
each optimiser step `after_optimizer_step(group)` all-reduces that load over the data-parallel
ranks (the global batch: every micro-batch of every rank), then b_e += rate * sign(mean load -
load_e), re-centred to zero mean, and the load starts again from zero.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moe_layers.base import LinearRouter, Routing, count_ids

SCORES = ("softmax", "sigmoid")
BALANCE_SCOPES = ("call", "global")


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE's router z-loss: the mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def balance_loss(probs_TE: Tensor, counts_E: Tensor) -> Tensor:
    """Switch-style E * sum_e f_e P_e for top-K routing: f_e the share of the assignments counted
    in counts_E that went to expert e (no gradient; this call's T*K, or more tokens' for a global
    balance loss), P_e the mean over this call's tokens of expert e's routing probability.
    1 at perfect balance; transformers' `load_balancing_loss_func` is K times this."""
    f_E = counts_E.to(probs_TE.dtype) / counts_E.sum().clamp(min=1)
    return probs_TE.shape[1] * (f_E * probs_TE.mean(0)).sum()


def group_limited_mask(choice_TE: Tensor, n_groups: int, topk_groups: int) -> Tensor:
    """[T, E] bool: the experts of each token's `topk_groups` best groups, a group's score being
    the sum of its two best experts' choice scores (DeepSeek-V3; one expert per group: its own)."""
    T, E = choice_TE.shape
    per_group_TNM = choice_TE.reshape(T, n_groups, E // n_groups)
    best = min(2, E // n_groups)
    group_TN = per_group_TNM.topk(best, dim=-1).values.sum(-1)
    keep_TN = torch.zeros_like(group_TN, dtype=torch.bool)
    keep_TN.scatter_(1, group_TN.topk(topk_groups, dim=-1).indices, True)
    return keep_TN.repeat_interleave(E // n_groups, dim=1)


class TopKRouter(LinearRouter):
    """Top-K of E experts per token from the logits x @ gate.T, gate [E, D].

    score: "softmax" (over the E experts) or "sigmoid" (each expert on its own, DeepSeek-V3).
    softmax_after_topk: the K chosen gates are the softmax of the K chosen logits (Mixtral's
        formulation; equal to softmax scores renormalised over the K). Needs score="softmax".
    normalize: divide the K chosen scores by their sum (Mixtral, Qwen3-MoE, DeepSeek-V3; not
        OLMoE or Qwen2-MoE's defaults).
    route_scale: multiplies the gates (DeepSeek-V3's routed_scaling_factor).
    n_groups, topk_groups: choose only among the experts of the `topk_groups` best of `n_groups`
        equal groups (see group_limited_mask); n_groups=1 chooses among all.
    z_loss_weight: weight of the router z-loss, recorded as "router_z" in training.
    balance_loss_weight: weight of `balance_loss` over this call's tokens (P from the softmax
        scores, or the sigmoid scores normalised over the experts), recorded as "balance".
    balance_scope: the assignments f counts: "call" (this call's, e.g. one micro-batch of one
        rank) or "global" (summed over the ranks of the default process group by an all-reduce
        in the forward, Qwen's global-batch balance; P stays this call's; every rank must run
        the same training forwards). Without torch.distributed initialised the two are equal.
    bias_update_rate: None (no expert bias) or a rate >= 0: the expert bias buffer `expert_bias`
        [E] is added to the scores for the choice only, and updated by `after_optimizer_step` at
        this rate (0 keeps it fixed, e.g. as loaded from a checkpoint).
    Half-precision logits are scored in float32.
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        *,
        k: int,
        score: str = "softmax",
        softmax_after_topk: bool = False,
        normalize: bool = True,
        route_scale: float = 1.0,
        n_groups: int = 1,
        topk_groups: int = 1,
        z_loss_weight: float = 0.0,
        balance_loss_weight: float = 0.0,
        balance_scope: str = "call",
        bias_update_rate: float | None = None,
    ) -> None:
        super().__init__(d_model, n_experts)
        self.k, self.score, self.softmax_after_topk = k, score, softmax_after_topk
        self.normalize, self.route_scale = normalize, route_scale
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.z_loss_weight, self.balance_loss_weight = z_loss_weight, balance_loss_weight
        self.balance_scope = balance_scope
        self.bias_update_rate = bias_update_rate
        if bias_update_rate is not None:
            self.register_buffer("expert_bias", torch.zeros(n_experts))
        # the assignments counted since the last optimiser step (see the module doc)
        self.pending_load: Tensor | None = None
        self.last_load: Tensor | None = None

    @property
    def has_bias(self) -> bool:
        return self.bias_update_rate is not None

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD)
        logits_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32))
        if self.score == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
        else:
            scores_TE = torch.sigmoid(logits_TE)
        idx_TK = self.choose(scores_TE.detach())
        if self.softmax_after_topk:
            gates_TK = torch.softmax(logits_TE.gather(1, idx_TK), dim=-1)
        else:
            gates_TK = scores_TE.gather(1, idx_TK)
            if self.normalize:
                total = gates_TK.sum(-1, keepdim=True)
                gates_TK = gates_TK / total.clamp(min=torch.finfo(total.dtype).tiny)
        if self.route_scale != 1.0:
            gates_TK = gates_TK * self.route_scale
        counts_E = count_ids(idx_TK, self.n_experts)
        probs_TE = scores_TE if self.score == "softmax" else self._normalized(scores_TE)
        aux = {}
        if self.training:
            if self.has_bias:
                self._add_load(counts_E)
            balance_counts_E = counts_E
            if self.balance_loss_weight > 0 and self.balance_scope == "global":
                # before the empty-batch check: every rank joins the all-reduce
                balance_counts_E = self._summed_over_ranks(counts_E)
            if x_TD.shape[0] > 0:
                if self.z_loss_weight > 0:
                    aux["router_z"] = self.z_loss_weight * router_z_loss(logits_TE)
                if self.balance_loss_weight > 0:
                    balance = balance_loss(probs_TE, balance_counts_E)
                    aux["balance"] = self.balance_loss_weight * balance
        return Routing(idx_TK, gates_TK, counts_E, probs_TE=probs_TE.detach(), aux_losses=aux)

    @staticmethod
    def _summed_over_ranks(counts_E: Tensor) -> Tensor:
        if not (dist.is_available() and dist.is_initialized()):
            return counts_E
        total_E = counts_E.detach().clone()
        dist.all_reduce(total_E)
        return total_E

    @staticmethod
    def _normalized(scores_TE: Tensor) -> Tensor:
        return scores_TE / scores_TE.sum(-1, keepdim=True).clamp(
            min=torch.finfo(scores_TE.dtype).tiny
        )

    def choose(self, scores_TE: Tensor) -> Tensor:
        """[T, K] the chosen experts: top-K of the scores plus the bias, within the kept groups."""
        choice_TE = scores_TE
        if self.has_bias:
            choice_TE = choice_TE + self.expert_bias.to(choice_TE.dtype)
        if self.n_groups > 1:
            keep_TE = group_limited_mask(choice_TE, self.n_groups, self.topk_groups)
            choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
        return choice_TE.topk(self.k, dim=-1).indices

    def _add_load(self, counts_E: Tensor) -> None:
        with torch.no_grad():
            counts_E = counts_E.detach()
            if self.pending_load is None or self.pending_load.device != counts_E.device:
                self.pending_load = counts_E.clone()
            else:
                self.pending_load += counts_E

    @torch.no_grad()
    def after_optimizer_step(self, group=None) -> None:
        """The global batch's load (this optimiser step's micro-batches, summed over the ranks of
        `group` when torch.distributed is initialised; every rank must call this) moves the bias:
        b += rate * sign(mean load - load), then b -= mean(b). A no-op without an expert bias."""
        if not self.has_bias:
            return
        bias_E = self.expert_bias
        load_E = self.pending_load
        if load_E is None or load_E.device != bias_E.device:
            load_E = torch.zeros(self.n_experts, dtype=torch.int64, device=bias_E.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load_E, group=group)
        self.pending_load = None
        self.last_load = load_E
        if self.bias_update_rate > 0:
            # no host read of the load: an all-zero load (no training forward) moves nothing
            load = load_E.to(bias_E.dtype)
            bias_E += self.bias_update_rate * torch.sign(load.mean() - load)
            bias_E -= bias_E.mean()


__all__ = [
    "BALANCE_SCOPES",
    "SCORES",
    "TopKRouter",
    "balance_loss",
    "group_limited_mask",
    "router_z_loss",
]
