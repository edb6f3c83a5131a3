"""GShard top-2 mixture of experts as in fairseq's MoE language models (Artetxe et al. 2022).

The gate is fairseq's `top2gating` (fairseq/modules/moe/top2gate.py) written anew: softmax gate,
top-1 expert always selected, a second expert chosen by one of three policies, a per-expert capacity
with token dropping in token order (all top-1 assignments queue before any second one), and the
GShard load-balancing loss l_aux = E * sum_e mean_t(g_te) * frac_e.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe_layers.base import (
    CapacityOptions,
    Experts,
    LinearRouter,
    RoutedMoE,
    Routing,
    check_bools,
    check_choice,
    check_non_negative,
    count_ids,
)

SECOND_POLICIES = ("sampling", "all", "random")


def init_ffn_experts(experts: Experts, n_layers: int) -> None:
    """Each expert initialised as a dense FFN of width G (pre-LN scale c = sqrt(2/L)).

    w1 ~ N(0, c²/d_model), w2 ~ N(0, c²/G): fairseq's experts are whole FFNs, unlike σ-MoE's
    slices of one wide FFN.
    """
    c = math.sqrt(2.0 / n_layers)
    nn.init.normal_(experts.w1, std=c * experts.d_model**-0.5)
    nn.init.normal_(experts.w2, std=c * experts.expert_size**-0.5)


def gshard_capacity(n_tokens: int, n_experts: int, factor: float) -> int:
    """fairseq's training capacity 2 * ceil(S/E), scaled by `factor` (1.0 is fairseq's)."""
    return math.ceil(factor * 2 * math.ceil(n_tokens / n_experts))


def slot_positions(mask_TE: Tensor, offset_E: Tensor) -> Tensor:
    """Queue position of every selected (token, expert) in its expert's buffer, in token order.

    Tokens queue after `offset_E` earlier entries (the top-1 assignments, for the second slot).
    Returns [T] positions for the rows of a one-hot mask (a row with no selection gets garbage).
    """
    pos_TE = torch.cumsum(mask_TE, dim=0) - 1 + offset_E
    return (pos_TE * mask_TE).sum(1)


def top2_gating(
    logits_TE: Tensor,
    capacity: int | None,
    second_policy: str,
    normalize_after_drop: bool,
    stochastic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Routes T tokens to 2 experts each under a per-expert capacity (None: no limit).

    `stochastic=False` makes the "sampling" and "random" policies pick the second expert as "all"
    does (no Gumbel noise, always kept), for deterministic evaluation.
    Returns idx [T, 2] ([T, 1] when E = 1), gates [T, 2] (0 for a dropped or unselected slot),
    the softmax probs [T, E], the selection count per expert before dropping [E], and the number
    of dropped assignments.
    """
    n_tokens, n_experts = logits_TE.shape
    # at least fp32 for the softmax (fairseq's fp32 gate), without demoting float64
    logits_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32))
    probs_TE = torch.softmax(logits_TE, dim=-1)
    e1_T = probs_TE.argmax(-1)
    mask1_TE = nn.functional.one_hot(e1_T, n_experts)
    scores_TE = logits_TE.detach()
    if stochastic and second_policy == "sampling":
        # Gumbel-max: the argmax of logits + Gumbel noise is a sample from softmax(logits)
        u_TE = torch.rand_like(scores_TE).clamp(min=1e-20, max=1 - 1e-7)
        scores_TE = scores_TE - torch.log(-torch.log(u_TE))
    e2_T = scores_TE.masked_fill(mask1_TE.bool(), float("-inf")).argmax(-1)
    mask2_TE = nn.functional.one_hot(e2_T, n_experts)
    g1_T = probs_TE.gather(1, e1_T[:, None]).squeeze(1)
    g2_T = probs_TE.gather(1, e2_T[:, None]).squeeze(1)
    if not normalize_after_drop:
        denom_T = (g1_T + g2_T).clamp(min=torch.finfo(g1_T.dtype).eps)
        g1_T, g2_T = g1_T / denom_T, g2_T / denom_T
    if stochastic and second_policy == "random":
        # GShard: keep the second expert with probability 2 * g2 (its gate, before renormalising)
        mask2_TE = mask2_TE * (2 * g2_T.detach() > torch.rand_like(g2_T))[:, None]
    if n_experts == 1:
        mask2_TE = torch.zeros_like(mask2_TE)
    counts_E = (mask1_TE + mask2_TE).sum(0)
    pos1_T = slot_positions(mask1_TE, torch.zeros_like(counts_E))
    pos2_T = slot_positions(mask2_TE, mask1_TE.sum(0))
    # no limit is a capacity of T: a token's two slots hold distinct experts
    limit = n_tokens if capacity is None else capacity
    keep1_T = pos1_T < limit
    keep2_T = mask2_TE.sum(1).bool() & (pos2_T < limit)
    g1_T = g1_T * keep1_T
    g2_T = g2_T * keep2_T
    if normalize_after_drop:
        denom_T = (g1_T + g2_T).clamp(min=torch.finfo(g1_T.dtype).eps)
        g1_T, g2_T = g1_T / denom_T, g2_T / denom_T
    dropped = counts_E.sum() - keep1_T.sum() - keep2_T.sum()
    idx_TK = torch.stack([e1_T, e2_T], dim=1)
    gates_TK = torch.stack([g1_T, g2_T], dim=1)
    if n_experts == 1:
        # no second expert exists: one slot (the expert kernels take K <= E only)
        idx_TK, gates_TK = idx_TK[:, :1], gates_TK[:, :1]
    return idx_TK, gates_TK, probs_TE, counts_E, dropped


def gshard_balance_loss(probs_TE: Tensor, idx_TK: Tensor) -> Tensor:
    """l_aux = E * sum_e mean_t(g_te) * frac_e, frac_e the share of tokens whose top-1 is e.

    Equals 1 for perfectly uniform gates and assignments; only the mean gate carries gradient.
    """
    n_experts = probs_TE.shape[-1]
    frac_E = count_ids(idx_TK[:, 0], n_experts).to(probs_TE.dtype)
    frac_E = frac_E / probs_TE.shape[0]
    return n_experts * (probs_TE.mean(0) * frac_E).sum()


class Top2Router(LinearRouter):
    """fairseq's top-2 gate on x @ gate.T (see GShardMoE for the options)."""

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        *,
        second_policy: str,
        capacity_factor: float | None,
        eval_capacity_factor: float | None,
        normalize_after_drop: bool,
        load_balance_weight: float,
        gate_noise: float,
        stochastic_eval: bool,
    ) -> None:
        super().__init__(d_model, n_experts)
        self.second_policy = second_policy
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.normalize_after_drop = normalize_after_drop
        self.load_balance_weight, self.gate_noise = load_balance_weight, gate_noise
        self.stochastic_eval = stochastic_eval

    def capacity(self, n_tokens: int) -> int | None:
        """Assignments each expert takes from a call of n_tokens; None: no limit."""
        if self.training:
            f = self.capacity_factor
            return None if f is None else gshard_capacity(n_tokens, self.n_experts, f)
        f = self.eval_capacity_factor
        return None if f is None else math.ceil(f * n_tokens)

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD)
        if self.training and self.gate_noise > 0:
            logits_TE = logits_TE + self.gate_noise * torch.randn_like(logits_TE)
        idx_TK, gates_TK, probs_TE, counts_E, dropped = top2_gating(
            logits_TE,
            self.capacity(x_TD.shape[0]),
            self.second_policy,
            self.normalize_after_drop,
            stochastic=self.training or self.stochastic_eval,
        )
        aux = {}
        if self.training and self.load_balance_weight > 0 and x_TD.shape[0] > 0:
            loss = gshard_balance_loss(probs_TE, idx_TK)
            aux["gshard_balance"] = self.load_balance_weight * loss
        return Routing(idx_TK, gates_TK, counts_E, dropped, probs_TE.detach(), aux)


class GShardMoE(RoutedMoE):
    """fairseq/GShard top-2 MoE feed-forward layer: y = layer(x), x and y [..., d_model].

    second_policy: how the second expert is picked: "sampling" (argmax of logits + Gumbel noise,
        i.e. sampled from the softmax without the top-1; fairseq's default), "all" (the second-best
        logit), "random" (the second-best, kept with probability 2 * g_e2, GShard's rule). In eval
        mode "sampling" and "random" act as "all" unless `stochastic_eval=True` (fairseq keeps
        them stochastic in evaluation too).
    capacity_factor: in training, None (no capacity limit: no assignment dropped) or a positive
        float f: each expert takes at most C = ceil(f * 2 * ceil(S/E)) assignments, S the number
        of tokens in the call (f = 1 is fairseq's training capacity), all top-1 assignments
        queued in token order before any second one.
    eval_capacity_factor: in eval mode, None (default: no capacity limit, so that routing is
        token-local: evaluation is causal and independent of batch-mates and padding) or a
        positive float f: C = ceil(f * S) with the training queue order (fairseq's
        moe_eval_capacity_token_fraction). The latter is not causal: as every top-1 assignment
        queues before any second one, a later token can push an earlier token's second expert
        out of its buffer.
    normalize_after_drop: renormalise the two gates over the kept slots after dropping (fairseq's
        default); False normalises g1, g2 to sum 1 before dropping.
    load_balance_weight: w; in training records w * l_aux as "gshard_balance" (fairseq further
        multiplies by sample_size in its criterion; that scaling is the trainer's).
    gate_noise: std of Gaussian noise added to the gate logits in training (0: off). fairseq's
        top-2 gate has no such noise; this is the "optional gate noise" of the issue.
    dropout: dropout on the expert hidden activations in training.
    activation, n_layers (init scale), impl: as for SigmaMoE.

    Parameters: experts.w1 [E, d_model, G], experts.w2 [E, G, d_model], router.gate [E, d_model];
    no biases. Each expert is initialised as a dense FFN of width G (`init_ffn_experts`), the gate
    ~ N(0, 1/d_model). Ignores `token_ids`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(CapacityOptions):
        capacity_factor: float | None = 1.0
        second_policy: str = "sampling"
        normalize_after_drop: bool = True
        gate_noise: float = 0.0
        stochastic_eval: bool = False

        def __post_init__(self) -> None:
            super().__post_init__()
            check_choice(self, "second_policy", SECOND_POLICIES)
            check_bools(self, "normalize_after_drop", "stochastic_eval")
            check_non_negative(self, "gate_noise")

        @property
        def slots(self) -> int:
            return min(2, self.n_experts)

    def build_router(self) -> Top2Router:
        c = self.config
        return Top2Router(
            c.d_model,
            c.n_experts,
            second_policy=c.second_policy,
            normalize_after_drop=c.normalize_after_drop,
            gate_noise=c.gate_noise,
            stochastic_eval=c.stochastic_eval,
            **c.capacity_options(),
        )

    def reset_parameters(self) -> None:
        init_ffn_experts(self.experts, self.config.n_layers)
        nn.init.normal_(self.router.gate, std=self.config.d_model**-0.5)
