"""Switch Transformer routing (Fedus et al. 2021), the σ-MoE paper's Switch baseline.

Each token goes to the one expert of largest softmax gate probability p_e and is scaled by p_e.
With a capacity C, each expert takes at most C tokens, first come (in token order) first served;
the rest are dropped: their output is zero, so the residual carries them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_layers.base import (
    CapacityOptions,
    LinearRouter,
    RoutedMoE,
    Routing,
    check_bools,
    check_choice,
    check_option,
    count_ids,
    is_finite,
)
from moe_layers.sigma_moe import INITS, init_sigma_moe

BALANCE_VARIANTS = ("switch", "csordas")
CAPACITY_ROUNDINGS = ("switch", "fairseq")


def switch_capacity(n_tokens: int, n_experts: int, factor: float, rounding: str) -> int:
    """Training capacity per expert of a call of n_tokens: "switch" ceil(f * S / E) (Fedus et al.),
    "fairseq" int(f * ceil(S / E)) (fairseq's top1gating), which may be larger or smaller."""
    if rounding == "fairseq":
        return int(factor * math.ceil(n_tokens / n_experts))
    return math.ceil(factor * n_tokens / n_experts)


def capacity_keep_mask(idx_T: Tensor, n_experts: int, capacity: int) -> Tensor:
    """[T] bool: whether token t is within its expert's first `capacity` tokens in token order."""
    one_hot_TE = torch.nn.functional.one_hot(idx_T, n_experts)
    position_T = (one_hot_TE.cumsum(0) * one_hot_TE).sum(-1) - 1
    return position_T < capacity


def switch_balance_loss(probs_TE: Tensor, idx_T: Tensor, variant: str) -> Tensor:
    """Load-balancing loss from the router probabilities and the (no-grad) top-1 assignments.

    f_e: share of tokens routed to e, P_e: mean router probability of e.
    "switch": E * sum_e f_e P_e (Fedus et al.; 1 at perfect balance).
    "csordas": mean over tokens and experts of p_te * f_e = sum_e f_e P_e / E, the authors' code.
    """
    n_experts = probs_TE.shape[-1]
    f_E = count_ids(idx_T, n_experts).to(probs_TE.dtype) / idx_T.shape[0]
    dot = (f_E * probs_TE.mean(0)).sum()
    return n_experts * dot if variant == "switch" else dot / n_experts


class SwitchRouter(LinearRouter):
    """Top-1 of softmax(x @ gate.T), gated by its probability, under SwitchMoE's capacity rules."""

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        *,
        capacity_factor: float | None,
        eval_capacity_factor: float | None,
        load_balance_weight: float,
        balance_variant: str,
        capacity_rounding: str = "switch",
    ) -> None:
        super().__init__(d_model, n_experts)
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.capacity_rounding = capacity_rounding
        self.load_balance_weight, self.balance_variant = load_balance_weight, balance_variant

    def capacity(self, n_tokens: int) -> int | None:
        """Tokens each expert takes from a call of n_tokens; None: no limit."""
        if self.training:
            f = self.capacity_factor
            if f is None:
                return None
            return switch_capacity(n_tokens, self.n_experts, f, self.capacity_rounding)
        f = self.eval_capacity_factor
        return None if f is None else math.ceil(f * n_tokens)

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        T = x_TD.shape[0]
        logits_TE = self.logits(x_TD)
        # half-precision inputs route in float32
        probs_TE = torch.softmax(
            logits_TE, dim=-1, dtype=torch.promote_types(logits_TE.dtype, torch.float32)
        )
        gate_T, idx_T = probs_TE.max(dim=-1)
        counts_E = count_ids(idx_T, self.n_experts)
        dropped = 0
        capacity = self.capacity(T)
        if capacity is not None:
            keep_T = capacity_keep_mask(idx_T, self.n_experts, capacity)
            dropped = (~keep_T).sum()
            gate_T = gate_T * keep_T
        aux = {}
        if self.training and self.load_balance_weight > 0 and T > 0:
            balance = switch_balance_loss(probs_TE, idx_T, self.balance_variant)
            aux["switch_balance"] = self.load_balance_weight * balance
        return Routing(
            idx_T.unsqueeze(-1),
            gate_T.unsqueeze(-1),
            counts_E,
            dropped=dropped,
            probs_TE=probs_TE.detach(),
            aux_losses=aux,
        )


class SwitchMoE(RoutedMoE):
    """Switch (top-1 softmax-gated) MoE FFN: y = p_e(x) * expert_e(x), e = argmax p(x).

    capacity_factor: in training, None (no capacity limit: every token is processed, the σ-MoE
        paper's setting) or a positive float f (each expert takes at most ceil(f * T / E) of the
        call's T tokens, in token order; the rest are dropped).
    capacity_rounding: how the training capacity is rounded: "switch" (ceil(f * T / E), the Switch
        paper) or "fairseq" (int(f * ceil(T / E)), fairseq's top1gating; e.g. T = 100, E = 8,
        f = 2 gives 25 slots per expert with "switch", 26 with "fairseq").
    eval_capacity_factor: in eval mode, None (default: no capacity limit, so that a token's output
        depends on that token only: evaluation is causal and independent of batch-mates and
        padding) or a positive float f: each expert takes at most ceil(f * T) tokens, in token
        order as in training (fairseq's eval capacity, a fraction of the tokens), so that a token
        may be dropped because of the tokens before it in the call, batch-mates and padding
        included.
    load_balance_weight: weight of the balancing loss recorded as "switch_balance" in training.
    balance_variant: "switch" (Fedus et al., E * sum f_e P_e) or "csordas" (the σ-MoE authors'
        normalisation, mean over tokens and experts of p_te f_e, which is the former / E²).
    n_layers, activation, dropout (on the expert hidden), impl: as SigmaMoE.
    init: as SigmaMoE ("dense" default; the σ-MoE authors' Switch runs used "expert_size").
    init_scale: multiplies the variance of w1, w2 and the gate: c = sqrt(init_scale * 2 / n_layers)
        in the stds c/sqrt(d_model) (w1, gate) and c/sqrt(width) (w2). The σ-MoE authors' Switch
        runs used 0.1 (`moe.init_scale`, which their code applies as sqrt(0.1) to the stds).
    normalize_gate_rows: True (default, σ-MoE's init) rescales every gate row to norm c; False
        leaves the rows as drawn (the authors' Switch runs, `moe.norm_expert_sel_init=0`).
    The σ-MoE authors' Switch: init="expert_size", init_scale=0.1, normalize_gate_rows=False
        (at d_model=1024, E=8, G=512, L=18: w1 and gate std 0.0033, w2 std 0.0047).
    Parameters: experts.w1 [E, d_model, G], experts.w2 [E, G, d_model], router.gate [E, d_model].
    Ignores `token_ids`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(CapacityOptions):
        capacity_rounding: str = "switch"
        balance_variant: str = "switch"
        init: str = "dense"
        init_scale: float = 1.0
        normalize_gate_rows: bool = True

        def __post_init__(self) -> None:
            super().__post_init__()
            check_choice(self, "capacity_rounding", CAPACITY_ROUNDINGS)
            check_choice(self, "balance_variant", BALANCE_VARIANTS)
            check_choice(self, "init", INITS)
            check_option(
                self, ["init_scale"], lambda v: is_finite(v) and v > 0, "a finite number > 0"
            )
            check_bools(self, "normalize_gate_rows")

    def build_router(self) -> SwitchRouter:
        c = self.config
        return SwitchRouter(
            c.d_model,
            c.n_experts,
            balance_variant=c.balance_variant,
            capacity_rounding=c.capacity_rounding,
            **c.capacity_options(),
        )

    def reset_parameters(self) -> None:
        c = self.config
        init_sigma_moe(
            self,
            c.n_layers,
            c.init,
            init_scale=c.init_scale,
            normalize_gate_rows=c.normalize_gate_rows,
        )
