"""Switch Transformer routing (Fedus et al. 2021), the σ-MoE paper's Switch baseline.

Each token goes to the one expert of largest softmax gate probability p_e and is scaled by p_e.
With a capacity factor f, each expert takes at most ceil(f * T / E) tokens, first come (in token
order) first served; the rest are dropped: their output is zero, so the residual carries them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moe_layers.base import RoutedExperts, check_choice, check_positive, check_probability
from moe_layers.sigma_moe import init_sigma_moe

BALANCE_VARIANTS = ("switch", "csordas")


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
    f_E = torch.bincount(idx_T, minlength=n_experts).to(probs_TE.dtype) / idx_T.shape[0]
    dot = (f_E * probs_TE.mean(0)).sum()
    return n_experts * dot if variant == "switch" else dot / n_experts


class SwitchMoE(RoutedExperts):
    """Switch (top-1 softmax-gated) MoE FFN: y = p_e(x) * expert_e(x), e = argmax p(x).

    capacity_factor: None (no dropping: every token is processed, the σ-MoE paper's setting) or a
        positive float f (each expert takes at most ceil(f * T / E) tokens; the rest are dropped).
    load_balance_weight: weight of the balancing loss recorded as "switch_balance" in training.
    balance_variant: "switch" (Fedus et al., E * sum f_e P_e) or "csordas" (the σ-MoE authors'
        normalisation, mean over tokens and experts of p_te f_e, which is the former / E²).
    n_layers, activation, dropout (on the expert hidden), impl: as SigmaMoE.
    init: as SigmaMoE ("dense" default; the σ-MoE authors' Switch runs used "expert_size").
    Parameters: w1 [E, d_model, G], w2 [E, G, d_model], gate [E, d_model].
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        expert_size: int,
        *,
        capacity_factor: float | None = None,
        load_balance_weight: float = 0.01,
        balance_variant: str = "switch",
        n_layers: int = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        init: str = "dense",
        impl: str = "fast",
    ) -> None:
        check_positive(n_layers=n_layers)
        if capacity_factor is not None:
            check_positive(capacity_factor=capacity_factor)
        if not load_balance_weight >= 0:
            raise ValueError(f"load_balance_weight must be >= 0, got {load_balance_weight!r}")
        check_choice("balance_variant", balance_variant, BALANCE_VARIANTS)
        check_choice("init", init, ("dense", "expert_size"))
        check_probability(dropout=dropout)
        super().__init__(d_model, n_experts, expert_size, activation, impl, hidden_dropout=dropout)
        self.capacity_factor, self.load_balance_weight = capacity_factor, load_balance_weight
        self.balance_variant = balance_variant
        self.gate = nn.Parameter(torch.empty(n_experts, d_model))
        init_sigma_moe(self, n_layers, init)

    def capacity(self, n_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens / self.n_experts)

    def forward(self, x: Tensor) -> Tensor:
        self._start_forward()
        x_TD = x.reshape(-1, self.d_model)
        T = x_TD.shape[0]
        logits_TE = x_TD @ self.gate.t()
        # half-precision inputs route in float32
        probs_TE = torch.softmax(
            logits_TE, dim=-1, dtype=torch.promote_types(logits_TE.dtype, torch.float32)
        )
        gate_T, idx_T = probs_TE.max(dim=-1)
        counts_E = torch.bincount(idx_T, minlength=self.n_experts)
        dropped = 0
        capacity = self.capacity(T)
        if capacity is not None:
            keep_T = capacity_keep_mask(idx_T, self.n_experts, capacity)
            dropped = (~keep_T).sum()
            gate_T = gate_T * keep_T
        if self.training and self.load_balance_weight > 0 and T > 0:
            balance = switch_balance_loss(probs_TE, idx_T, self.balance_variant)
            self.record_aux_loss("switch_balance", self.load_balance_weight * balance)
        self.record_routing_stats(counts_E, n_tokens=T, probs_TE=probs_TE.detach(), dropped=dropped)
        gates_TK = gate_T.to(x_TD.dtype).unsqueeze(-1)
        return self.expert_forward(x_TD, idx_T.unsqueeze(-1), gates_TK).reshape(x.shape)
