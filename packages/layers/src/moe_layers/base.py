"""The one convention every layer in moe_layers follows for auxiliary losses and routing statistics.

Auxiliary losses
    A layer records its auxiliary (regularisation) losses during each forward pass in training mode,
    already multiplied by their configured weights, with `self.record_aux_loss(name, value)`. In eval
    mode no auxiliary loss is recorded. `collect_aux_losses(model)` walks every submodule and returns
    `{name: sum over layers}` for the latest forward pass of each layer, so that a trainer adds
    `sum(collect_aux_losses(model).values())` to its LM loss without knowing the layer types
    (the σ-MoE paper sums its entropy regulariser over layers; so does fairseq with `--moe-loss-sum`).

Routing statistics
    A routed layer records a `RoutingStats` (detached, no gradient) on every forward pass, in training
    and eval, with `self.record_routing_stats(...)`. `collect_routing_stats(model)` returns them keyed by
    the qualified module name.
"""

from __future__ import annotations

from dataclasses import dataclass

import moe_kernels
import torch
from torch import Tensor, nn
from torch.nn import functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
IMPLS = ("fast", "reference")


@dataclass(frozen=True)
class RoutingStats:
    """What a routed layer did with the tokens of one forward pass.

    expert_counts: [E] assignments (token, slot) each expert was selected for, before any dropping.
    n_tokens: tokens routed.
    dropped_count, entropy_nats: 0-dim tensors; read them as `dropped` (int: assignments removed by
        a capacity limit, 0 for layers without one) and `entropy` (float: nats of the
        batch-averaged selection distribution over experts).

    Everything stays on the layer's device, so that recording the statistics never makes the host
    wait for the GPU; reading `dropped` or `entropy` does.
    """

    expert_counts: Tensor
    n_tokens: int
    dropped_count: Tensor
    entropy_nats: Tensor

    @property
    def dropped(self) -> int:
        return int(self.dropped_count)

    @property
    def entropy(self) -> float:
        return float(self.entropy_nats)

    @property
    def usage(self) -> Tensor:
        """Share of assignments per expert, [E], summing to 1 (all zeros when no token was routed)."""
        total = self.expert_counts.sum()
        return self.expert_counts.float() / total.clamp(min=1)


class MoEModule(nn.Module):
    """Base of every layer here: holds the latest forward pass's auxiliary losses and statistics."""

    def __init__(self) -> None:
        super().__init__()
        self._aux_losses: dict[str, Tensor] = {}
        self._routing_stats: RoutingStats | None = None

    def record_aux_loss(self, name: str, value: Tensor) -> None:
        self._aux_losses[name] = value

    def record_routing_stats(
        self,
        expert_counts: Tensor,
        n_tokens: int,
        probs_TE: Tensor | None = None,
        dropped: int | Tensor = 0,
    ) -> None:
        """probs_TE: each token's selection distribution over experts; its batch mean gives the entropy.

        Without it, the entropy is that of the assignment counts. `dropped` may be a tensor, so
        that a layer need not read it back from the GPU.
        """
        with torch.no_grad():
            if probs_TE is not None and probs_TE.shape[0] > 0:
                p = probs_TE.float().mean(0)
            else:
                p = expert_counts.float() / expert_counts.sum().clamp(min=1)
            entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
        self._routing_stats = RoutingStats(
            expert_counts=expert_counts.detach(),
            n_tokens=int(n_tokens),
            dropped_count=torch.as_tensor(dropped, device=expert_counts.device).detach(),
            entropy_nats=entropy,
        )

    def _start_forward(self) -> None:
        self._aux_losses = {}

    @property
    def aux_losses(self) -> dict[str, Tensor]:
        return dict(self._aux_losses)

    @property
    def routing_stats(self) -> RoutingStats | None:
        return self._routing_stats


def collect_aux_losses(module: nn.Module) -> dict[str, Tensor]:
    """Weighted auxiliary losses of the latest forward pass of every layer in `module`, summed per name."""
    out: dict[str, Tensor] = {}
    for m in module.modules():
        if isinstance(m, MoEModule):
            for name, value in m._aux_losses.items():
                out[name] = out[name] + value if name in out else value
    return out


def collect_routing_stats(module: nn.Module) -> dict[str, RoutingStats]:
    """Latest routing statistics of every routed layer in `module`, keyed by qualified module name."""
    return {
        name: m._routing_stats
        for name, m in module.named_modules()
        if isinstance(m, MoEModule) and m._routing_stats is not None
    }


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's where it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def check_positive(**options: int | float) -> None:
    for name, value in options.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(
            f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}"
        )


def check_probability(**options: float) -> None:
    """Dropout-like rates: in [0, 1)."""
    for name, value in options.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def reference_expert_mlp(
    x_TD, w1_EDG, w2_EGD, idx_TK, gates_TK, activation: str, hidden_dropout: float = 0.0
) -> Tensor:
    """Readable reference of the expert computation: a loop over experts.

    y[t] = sum_k gates[t, k] * dropout(act(x[t] @ w1[idx[t, k]])) @ w2[idx[t, k]].
    `hidden_dropout` > 0 applies (training-mode) dropout to the expert hidden activations.
    """
    act = ACTIVATIONS[activation]
    y_TD = torch.zeros_like(x_TD)
    for e in range(w1_EDG.shape[0]):
        # an expert without tokens still joins the graph, so that y has a gradient path (zeros)
        tok, slot = torch.nonzero(idx_TK == e, as_tuple=True)
        u = act(x_TD[tok] @ w1_EDG[e])
        if hidden_dropout > 0:
            u = F.dropout(u, hidden_dropout)
        h = u @ w2_EGD[e]
        y_TD = y_TD.index_add(0, tok, h * gates_TK[tok, slot].unsqueeze(-1).to(h.dtype))
    return y_TD


class RoutedExperts(MoEModule):
    """Base of the layers whose experts are two-layer MLPs `act(x @ w1[e]) @ w2[e]`.

    A subclass routes each token to K experts (idx [T, K], gates [T, K]; a slot dropped by a capacity
    limit has gate 0) and calls `self.expert_forward`. `impl="fast"` runs moe_kernels.expert_mlp,
    `impl="reference"` the loop over experts above; `ExpertParallel` replaces `expert_forward` to
    shard the experts across ranks.

    hidden_dropout: dropout on the expert hidden activations in training (the σ-MoE code's
    `dropout`); the fast path then runs the two expert matmuls separately, since expert_mlp fuses them.
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        expert_size: int,
        activation: str,
        impl: str,
        hidden_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive(d_model=d_model, n_experts=n_experts, expert_size=expert_size)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("impl", impl, IMPLS)
        check_probability(dropout=hidden_dropout)
        self.d_model, self.n_experts, self.expert_size = d_model, n_experts, expert_size
        self.activation, self.impl = activation, impl
        self.hidden_dropout = hidden_dropout
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, expert_size))
        self.w2 = nn.Parameter(torch.empty(n_experts, expert_size, d_model))

    def expert_forward(self, x_TD: Tensor, idx_TK: Tensor, gates_TK: Tensor) -> Tensor:
        p = self.hidden_dropout if self.training else 0.0
        # autocast does not reach inside the expert kernels: cast to its dtype here, so that under
        # bf16/fp16 autocast the experts run in low precision like any matmul of the model
        dtype = compute_dtype(x_TD)
        x_TD, gates_TK = x_TD.to(dtype), gates_TK.to(dtype)
        w1_EDG, w2_EGD = self.w1.to(dtype), self.w2.to(dtype)
        if self.impl == "reference":
            return reference_expert_mlp(
                x_TD, w1_EDG, w2_EGD, idx_TK, gates_TK, self.activation, hidden_dropout=p
            )
        if p > 0:
            u_TKG = ACTIVATIONS[self.activation](moe_kernels.expert_matmul(x_TD, w1_EDG, idx_TK))
            return moe_kernels.expert_matmul(F.dropout(u_TKG, p), w2_EGD, idx_TK, gates_TK)
        return moe_kernels.expert_mlp(x_TD, w1_EDG, w2_EGD, idx_TK, gates_TK, self.activation)
