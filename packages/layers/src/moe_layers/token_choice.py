"""TokenChoiceMoE: today's token-choice MoE FFN (fine-grained routed experts, always-on shared
experts, SwiGLU), on the general `TopKRouter`.

Shapes: T tokens, D = d_model, E routed experts, G expert width, K experts per token, S width of
the shared expert MLP (n_shared_experts * shared_expert_size).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moe_layers.base import (
    ACTIVATIONS,
    GATED_ACTIVATIONS,
    Experts,
    ExpertsConfig,
    ParameterCount,
    RoutedMoE,
    TopK,
    check_at_most,
    check_bools,
    check_choice,
    check_non_negative,
    check_option,
    check_sizes,
    compute_dtype,
    is_finite,
    is_int,
)
from moe_layers.router import BALANCE_SCOPES, SCORES, TopKRouter


def is_glu(activation: str) -> bool:
    return activation in GATED_ACTIVATIONS


class SharedExperts(nn.Module):
    """The always-on experts as one MLP of width S (n shared experts of width G summed are one MLP
    of width n*G), optionally scaled by sigmoid(x @ gate) (Qwen2-MoE's shared expert gate).

    Parameters: w1 [D, S], w3 [D, S] (SwiGLU only), w2 [S, D], gate [D, 1] (with the gate only).
    """

    def __init__(
        self, d_model: int, width: int, activation: str, gated_output: bool, hidden_dropout: float
    ) -> None:
        super().__init__()
        self.activation, self.hidden_dropout = activation, hidden_dropout
        self.w1 = nn.Parameter(torch.empty(d_model, width))
        self.w3 = nn.Parameter(torch.empty(d_model, width)) if is_glu(activation) else None
        self.w2 = nn.Parameter(torch.empty(width, d_model))
        self.gate = nn.Parameter(torch.empty(d_model, 1)) if gated_output else None

    def forward(self, x_TD: Tensor) -> Tensor:
        """x_TD in the matmuls' dtype (autocast's, as the routed experts run)."""
        w1_DS, w2_SD = self.w1.to(x_TD.dtype), self.w2.to(x_TD.dtype)
        if self.w3 is not None:
            up_TS = x_TD @ self.w3.to(x_TD.dtype)
            u_TS = GATED_ACTIVATIONS[self.activation](x_TD @ w1_DS) * up_TS
        else:
            u_TS = ACTIVATIONS[self.activation](x_TD @ w1_DS)
        y_TD = F.dropout(u_TS, self.hidden_dropout, self.training) @ w2_SD
        if self.gate is not None:
            y_TD = torch.sigmoid(x_TD @ self.gate.to(x_TD.dtype)) * y_TD
        return y_TD


class TokenChoiceMoE(RoutedMoE):
    """Token-choice MoE FFN: y = sum_k g_k(x) expert_{e_k}(x) + shared(x), the recipe of Mixtral,
    OLMoE, Qwen2/Qwen3-MoE and DeepSeek-V2/V3 (the README's table maps each to these options).

    n_experts, expert_size, k: E routed experts of width G, K per token.
    activation: "swiglu" (silu(x W1) * (x W3), then W2: three matrices per expert) or a plain
        "relu", "gelu", "silu" two-matrix MLP; the same for the shared experts.
    n_shared_experts, shared_expert_size: always-on experts, computed as one MLP of width
        n_shared_experts * shared_expert_size (default expert_size). shared_expert_gate: scale
        the shared output by sigmoid(x @ w_gate), w_gate [D, 1] (Qwen2-MoE).
    score, softmax_after_topk, normalize, route_scale, n_groups, topk_groups, z_loss_weight
        ("router_z"), balance_loss_weight ("balance"), balance_scope, bias_update_rate: the router's, see
        TopKRouter. With bias_update_rate set, call `after_optimizer_step(group)` (or
        moe_layers.after_optimizer_step(model, group)) after every optimiser step.
    n_layers, init_std: init. None: normal with std sqrt(2 / (n_layers * fan_in)) for the expert
        and shared matrices (the pre-LN init of the other layers here) and d_model^-1/2 for the
        router and the shared gate; a number: every matrix normal with that std (OLMoE's 0.02).
    dropout: on the expert hidden activations in training. impl: "fast" (moe_kernels) or
        "reference" (a loop over experts).
    Parameters: router.gate [E, D], experts.w1, experts.w3 (SwiGLU) [E, D, G], experts.w2
    [E, G, D], shared.* (see SharedExperts); buffer router.expert_bias [E] with an expert bias.
    Ignores `token_ids`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(ExpertsConfig, TopK):
        activations = (*ACTIVATIONS, *GATED_ACTIVATIONS)
        activation: str = "swiglu"
        n_shared_experts: int = 0
        shared_expert_size: int | None = None
        shared_expert_gate: bool = False
        score: str = "softmax"
        softmax_after_topk: bool = False
        normalize: bool = True
        route_scale: float = 1.0
        n_groups: int = 1
        topk_groups: int = 1
        z_loss_weight: float = 0.0
        balance_loss_weight: float = 0.0
        balance_scope: str = "call"
        bias_update_rate: float | None = None
        init_std: float | None = None

        def __post_init__(self) -> None:
            super().__post_init__()
            check_option(self, ["n_shared_experts"], lambda v: is_int(v) and v >= 0, "an int >= 0")
            check_option(
                self,
                ["shared_expert_size"],
                lambda v: v is None or (is_int(v) and v > 0),
                "None or a positive int",
            )
            check_bools(self, "shared_expert_gate", "softmax_after_topk", "normalize")
            if self.shared_expert_gate and self.n_shared_experts == 0:
                raise ValueError("shared_expert_gate needs n_shared_experts > 0")
            check_choice(self, "score", SCORES)
            if self.softmax_after_topk and self.score != "softmax":
                raise ValueError("softmax_after_topk needs score='softmax'")
            positive = (lambda v: is_finite(v) and v > 0, "a finite number > 0")
            check_option(self, ["route_scale"], *positive)
            check_option(self, ["init_std"], lambda v: v is None or positive[0](v), "None or > 0")
            check_sizes(self, "n_groups", "topk_groups")
            if self.n_experts % self.n_groups:
                raise ValueError(
                    f"n_groups must divide n_experts ({self.n_experts}), got {self.n_groups}"
                )
            check_at_most(self, "topk_groups", self.n_groups, "n_groups")
            kept = self.topk_groups * (self.n_experts // self.n_groups)
            if self.k > kept:
                raise ValueError(
                    f"k must be at most the experts of the kept groups (topk_groups * n_experts "
                    f"/ n_groups = {kept}), got {self.k}"
                )
            check_non_negative(self, "z_loss_weight", "balance_loss_weight")
            check_choice(self, "balance_scope", BALANCE_SCOPES)
            check_option(
                self,
                ["bias_update_rate"],
                lambda v: v is None or (is_finite(v) and v >= 0),
                "None or a finite number >= 0",
            )

        @property
        def shared_width(self) -> int:
            return self.n_shared_experts * (self.shared_expert_size or self.expert_size)

        def parameter_count(self) -> ParameterCount:
            routed = super().parameter_count()
            matrices = 3 if is_glu(self.activation) else 2
            shared = matrices * self.d_model * self.shared_width
            shared += self.d_model if self.shared_expert_gate else 0
            return ParameterCount(total=routed.total + shared, active=routed.active + shared)

    def build_experts(self) -> Experts:
        """The routed experts; the shared ones (`self.shared`, None without) are built here too, so
        that both exist when RoutedMoE's __init__ calls reset_parameters."""
        c = self.config
        self.shared = (
            SharedExperts(c.d_model, c.shared_width, c.activation, c.shared_expert_gate, c.dropout)
            if c.n_shared_experts
            else None
        )
        return super().build_experts()

    def build_router(self) -> TopKRouter:
        c = self.config
        return TopKRouter(
            c.d_model,
            c.n_experts,
            k=c.k,
            score=c.score,
            softmax_after_topk=c.softmax_after_topk,
            normalize=c.normalize,
            route_scale=c.route_scale,
            n_groups=c.n_groups,
            topk_groups=c.topk_groups,
            z_loss_weight=c.z_loss_weight,
            balance_loss_weight=c.balance_loss_weight,
            balance_scope=c.balance_scope,
            bias_update_rate=c.bias_update_rate,
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        c = self.config
        scale = (2.0 / c.n_layers) ** 0.5

        def init(p: Tensor, fan_in: int, router: bool = False) -> None:
            std = c.init_std or (fan_in**-0.5 if router else scale * fan_in**-0.5)
            nn.init.normal_(p, std=std)

        init(self.router.gate, c.d_model, router=True)
        for name, p in self.experts.named_parameters():
            init(p, c.expert_size if name == "w2" else c.d_model)
        if self.shared is not None:
            for name, p in self.shared.named_parameters():
                if name == "gate":
                    init(p, c.d_model, router=True)
                else:
                    init(p, c.shared_width if name == "w2" else c.d_model)

    def forward_tokens(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Tensor:
        y_TD = super().forward_tokens(x_TD, token_ids_T)
        if self.router.has_bias and self._routing_stats is not None:
            self._routing_stats = dataclasses.replace(
                self._routing_stats, expert_bias=self.router.expert_bias.detach().clone()
            )
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD.to(compute_dtype(x_TD)))
        return y_TD

    def after_optimizer_step(self, group=None) -> None:
        self.router.after_optimizer_step(group)
