"""TokenChoiceMoE: today's token-choice MoE FFN (fine-grained routed experts, always-on shared
experts, SwiGLU), on the general `TopKRouter`.

Shapes: T tokens, D = d_model, E routed experts, G expert width, K experts per token, S width of
the shared expert MLP (n_shared_experts * shared_expert_size).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import moe_kernels
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moe_layers.base import (
    ACTIVATIONS,
    IMPLS,
    Experts,
    LayerConfig,
    ParameterCount,
    RoutedMoE,
    check_at_most,
    check_bools,
    check_choice,
    check_non_negative,
    check_option,
    check_probabilities,
    check_sizes,
    compute_dtype,
    is_finite,
    is_int,
)
from moe_layers.router import SCORES, TopKRouter

TOKEN_CHOICE_ACTIVATIONS = (*ACTIVATIONS, "swiglu")


def is_glu(activation: str) -> bool:
    return activation == "swiglu"


def reference_glu_expert_mlp(
    x_TD, w1_EDG, w3_EDG, w2_EGD, idx_TK, gates_TK, hidden_dropout: float = 0.0
) -> Tensor:
    """Readable reference of SwiGLU experts, a loop over experts (reads the device):
    y[t] = sum_k gates[t, k] * (silu(x[t] @ w1[e]) * (x[t] @ w3[e])) @ w2[e], e = idx[t, k]."""
    y_TD = torch.zeros_like(x_TD)
    for e in range(w1_EDG.shape[0]):
        tok, slot = torch.nonzero(idx_TK == e, as_tuple=True)
        x_ND = x_TD[tok]
        u = F.silu(x_ND @ w1_EDG[e]) * (x_ND @ w3_EDG[e])
        if hidden_dropout > 0:
            u = F.dropout(u, hidden_dropout)
        h = u @ w2_EGD[e]
        y_TD = y_TD.index_add(0, tok, h * gates_TK[tok, slot].unsqueeze(-1).to(h.dtype))
    return y_TD


def glu_expert_mlp(x_TD, w1_EDG, w3_EDG, w2_EGD, idx_TK, gates_TK, hidden_dropout: float = 0.0):
    """The fast SwiGLU experts: moe_kernels.expert_mlp's gated activation; with hidden dropout
    the three expert matmuls run separately (expert_mlp fuses them), the gating between them."""
    if hidden_dropout == 0:
        return moe_kernels.expert_mlp(x_TD, w1_EDG, w2_EGD, idx_TK, gates_TK, "swiglu", w3=w3_EDG)
    a_TKG = moe_kernels.expert_matmul(x_TD, w1_EDG, idx_TK)
    b_TKG = moe_kernels.expert_matmul(x_TD, w3_EDG, idx_TK)
    u_TKG = F.dropout(F.silu(a_TKG) * b_TKG, hidden_dropout)
    return moe_kernels.expert_matmul(u_TKG, w2_EGD, idx_TK, gates_TK)


class GLUExperts(Experts):
    """E SwiGLU MLPs `(silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]`; otherwise as `Experts`.

    Parameters: w1 [E, D, G] (the gate projection), w3 [E, D, G] (the up projection), w2 [E, G, D].
    """

    def __init__(self, d_model, n_experts, expert_size, *, hidden_dropout=0.0, impl="fast"):
        super().__init__(
            d_model,
            n_experts,
            expert_size,
            activation="swiglu",
            hidden_dropout=hidden_dropout,
            impl=impl,
        )
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, expert_size))

    def forward(self, x_TD: Tensor, idx_TK: Tensor, gates_TK: Tensor) -> Tensor:
        p = self.hidden_dropout if self.training else 0.0
        dtype = compute_dtype(x_TD)
        args = (
            x_TD.to(dtype),
            self.w1.to(dtype),
            self.w3.to(dtype),
            self.w2.to(dtype),
            idx_TK,
            gates_TK.to(dtype),
        )
        if self.impl == "reference":
            return reference_glu_expert_mlp(*args, hidden_dropout=p)
        return glu_expert_mlp(*args, hidden_dropout=p)


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
        if self.w3 is not None:
            u_TS = F.silu(x_TD @ self.w1) * (x_TD @ self.w3)
        else:
            u_TS = ACTIVATIONS[self.activation](x_TD @ self.w1)
        y_TD = F.dropout(u_TS, self.hidden_dropout, self.training) @ self.w2
        if self.gate is not None:
            y_TD = torch.sigmoid(x_TD @ self.gate) * y_TD
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
        ("router_z"), balance_loss_weight ("balance"), bias_update_rate: the router's, see
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
    class Config(LayerConfig):
        positional = ("d_model", "n_experts", "expert_size")
        n_experts: int
        expert_size: int
        k: int = 2
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
        bias_update_rate: float | None = None
        n_layers: int = 1
        init_std: float | None = None
        dropout: float = 0.0
        impl: str = "fast"

        def __post_init__(self) -> None:
            super().__post_init__()
            check_sizes(
                self, "n_experts", "expert_size", "k", "n_groups", "topk_groups", "n_layers"
            )
            check_at_most(self, "k", self.n_experts, "n_experts")
            check_choice(self, "activation", TOKEN_CHOICE_ACTIVATIONS)
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
            check_option(
                self,
                ["bias_update_rate"],
                lambda v: v is None or (is_finite(v) and v >= 0),
                "None or a finite number >= 0",
            )
            check_probabilities(self, "dropout")
            check_choice(self, "impl", IMPLS)

        @property
        def shared_width(self) -> int:
            return self.n_shared_experts * (self.shared_expert_size or self.expert_size)

        def parameter_count(self) -> ParameterCount:
            matrices = 3 if is_glu(self.activation) else 2
            router = self.n_experts * self.d_model
            expert = matrices * self.d_model * self.expert_size
            shared = matrices * self.d_model * self.shared_width
            shared += self.d_model if self.shared_expert_gate else 0
            always = router + shared
            return ParameterCount(
                total=always + self.n_experts * expert, active=always + self.k * expert
            )

    def build_experts(self) -> Experts:
        """The routed experts; the shared ones (`self.shared`, None without) are built here too, so
        that both exist when RoutedMoE's __init__ calls reset_parameters."""
        c = self.config
        self.shared = (
            SharedExperts(c.d_model, c.shared_width, c.activation, c.shared_expert_gate, c.dropout)
            if c.n_shared_experts
            else None
        )
        if is_glu(c.activation):
            return GLUExperts(
                c.d_model, c.n_experts, c.expert_size, hidden_dropout=c.dropout, impl=c.impl
            )
        return Experts(
            c.d_model,
            c.n_experts,
            c.expert_size,
            activation=c.activation,
            hidden_dropout=c.dropout,
            impl=c.impl,
        )

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
        if self.router.has_bias:
            self._routing_stats = dataclasses.replace(
                self._routing_stats, expert_bias=self.router.expert_bias.detach().clone()
            )
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD.to(compute_dtype(x_TD)))
        return y_TD

    def after_optimizer_step(self, group=None) -> None:
        self.router.after_optimizer_step(group)
