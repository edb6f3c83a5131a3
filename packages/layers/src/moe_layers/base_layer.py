"""BASE layer (Lewis et al. 2021): balanced linear assignment of tokens to experts in training.

Training solves max sum_t s(t, e_t) over assignments giving every expert the same number of tokens
(at most ceil(T/E)), s(t, e) = x_t . c_e, with an auction algorithm (Bertsekas) in torch; inference
routes each token greedily to its best expert. fairseq's BASE layer is a separate residual block,
out = σ(x.c_e) f_e(x) + (1 - σ(x.c_e)) x with f_e(x) = x + FFN_e(LN(x)), i.e.
out = x + σ(x.c_e) FFN_e(LN_e(x)), each expert with its own LayerNorm LN_e and an FFN with biases,
FFN_e(h) = act(h W1_e + b1_e) W2_e + b2_e, routing on the raw residual stream. fairseq
zero-initialises only the output weight W2 (its `ff2.weight`); the output bias b2 keeps the
default init of a Linear, U(-1/sqrt(G), 1/sqrt(G)), so the block does not start as the identity:
at initialisation it adds σ(x.c_e) b2_e. As an FFN replacement inside a pre-LN block (which adds x
and applies the LN) this layer returns the routed part σ(x.c_e) FFN_e(x); `expert_norm=True` adds
LN_e, `expert_bias=True` the biases, `zero_init_output=True` the zero W2, and moe_models'
`moe_placement="standalone"` (with `n_moe_layers` for fairseq's positions) places it as fairseq
does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moe_layers.base import (
    ExpertsConfig,
    LinearRouter,
    ParameterCount,
    RoutedMoE,
    Routing,
    check_bools,
    check_choice,
    count_ids,
)
from moe_layers.gshard import init_ffn_experts


def _auction_round(
    values_NE: Tensor, prices_E: Tensor, owner_N: Tensor, bid_N: Tensor, cap: int, eps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One Jacobi round: every unassigned row bids for its best column; columns keep their top bids.

    A bid is the price that leaves the bidder indifferent between its best and second-best column,
    plus eps. A full column's price is its lowest kept bid. Returns the new prices, owners (-1:
    unassigned) and bids. Every row is computed and the unassigned ones selected with `where`,
    so that no size depends on the data; a round without unassigned rows changes nothing.
    """
    n_rows, n_cols = values_NE.shape
    free_N = owner_N < 0
    top_N2 = (values_NE - prices_E).topk(2, dim=1)
    best_N = top_N2.indices[:, 0]
    new_bid_N = values_NE.gather(1, best_N[:, None]).squeeze(1) - top_N2.values[:, 1] + eps
    owner_N = torch.where(free_N, best_N, owner_N)
    bid_N = torch.where(free_N, new_bid_N, bid_N)
    # rank of every row among its column's holders by bid (highest first): sort by bid, then
    # stably by column
    by_bid = torch.argsort(bid_N, descending=True, stable=True)
    order_N = by_bid[torch.argsort(owner_N[by_bid], stable=True)]
    counts_E = count_ids(owner_N, n_cols)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.empty_like(owner_N).scatter(
        0, order_N, torch.arange(n_rows, device=owner_N.device) - starts_E[owner_N[order_N]]
    )
    owner_N = torch.where(rank_N >= cap, -1, owner_N)
    lowest_kept_E = bid_N[order_N[(starts_E + cap - 1).clamp(max=n_rows - 1)]]
    prices_E = torch.where(counts_E >= cap, lowest_kept_E, prices_E)
    return prices_E, owner_N, bid_N


def _eps_phases(n_tokens: int) -> list[float]:
    """The ε of each phase as a fraction of the score range: 1/4, then /32 per phase down to the
    final 1e-9 / T. A function of T alone, so that the phases need no read of the scores."""
    final = 1e-9 / n_tokens
    steps = [max(0.25, final)]
    while steps[-1] > final:
        steps.append(max(steps[-1] / 32, final))
    return steps


def _auction(scores_TE: Tensor, eps: float | None, max_rounds: int) -> Tensor:
    """The body of moe_layers::balanced_assignment (see balanced_assignment); T >= 1, E >= 2."""
    n_tokens, n_experts = scores_TE.shape
    cap = math.ceil(n_tokens / n_experts)
    s_TE = scores_TE.to(torch.float64)
    values_NE = torch.cat([s_TE, s_TE.new_zeros(n_experts * cap - n_tokens, n_experts)])
    spread = values_NE.max() - values_NE.min()
    if eps is None:
        final = spread.clamp(min=1e-12) * (1e-9 / n_tokens)
        phases = [torch.maximum(spread * f, final) for f in _eps_phases(n_tokens)]
    else:
        # the phase count depends on the score range: one read
        phases = [max(float(spread) / 4, eps)]
        while phases[-1] > eps:
            phases.append(max(phases[-1] / 32, eps))
        phases = [values_NE.new_tensor(step) for step in phases]
    prices_E = values_NE.new_zeros(n_experts)
    rounds = 0
    for step in phases:
        owner_N = torch.full((values_NE.shape[0],), -1, dtype=torch.long, device=s_TE.device)
        bid_N = values_NE.new_zeros(values_NE.shape[0])
        # converged is read after 1, 2, 4, 8, ... rounds of the phase: at most twice the rounds
        # it needs, for 1 + ceil(log2(rounds)) host reads
        block, done = 1, 0
        while True:
            for _ in range(block):
                prices_E, owner_N, bid_N = _auction_round(
                    values_NE, prices_E, owner_N, bid_N, cap, step
                )
            done += block
            rounds += block
            if not bool((owner_N < 0).any()):
                break
            if rounds > max_rounds:
                raise RuntimeError(f"balanced_assignment did not converge in {max_rounds} rounds")
            block = min(done, max_rounds + 1 - rounds)
    return owner_N[:n_tokens]


# defined on a Library, not by torch.library.custom_op, whose kernel wrapper imports torch._dynamo
# (seconds, and sympy) at the op's first call in every eager program (as moe_kernels.library)
_LIBRARY = torch.library.Library("moe_layers", "FRAGMENT")
_LIBRARY.define("balanced_assignment" + torch.library.infer_schema(_auction, mutates_args=()))
_LIBRARY.impl("balanced_assignment", _auction, "CompositeExplicitAutograd")
_auction_op = torch.ops.moe_layers.balanced_assignment.default


@torch.library.register_fake(_auction_op, lib=_LIBRARY)
def _(scores_TE, eps, max_rounds):
    return scores_TE.new_empty(scores_TE.shape[0], dtype=torch.long)


def balanced_assignment(
    scores_TE: Tensor, eps: float | None = None, max_rounds: int = 100_000
) -> Tensor:
    """Expert per token maximising sum_t scores[t, e_t] with at most ceil(T/E) tokens per expert.

    An auction with ε-scaling, in float64 on the scores' device. T is padded with rows of zeros
    to E * ceil(T/E), so that every expert ends full (the pad rows add 0 to any assignment, so the
    real rows' optimum is unchanged) and prices can carry over between ε phases. The result is
    within T * eps of the optimum (ε-complementary slackness); the default eps is 1e-9 of the
    score range per token. Returns [T] int64 expert indices.

    Host reads (synchronisations on CUDA): an auction phase ends when every row holds a column,
    which the host must look at. It looks after 1, 2, 4, 8, ... rounds of each phase (a round
    with every row assigned changes nothing), so a phase needing r rounds costs
    1 + ceil(log2 r) reads and at most 2r - 1 rounds. The phases are a function of T alone
    (`_eps_phases`: 8 for T in [10, 999], 9 up to 9999, 10 up to 10^6), one read each at the
    least; seen on BASE-initialised layers: 25 reads for 512 tokens and 4 experts, 41 for 2048
    and 16, 56 for 4096 and 64. Given `eps`, one more read (the score range sets the phases).
    Nothing is read for T = 0 or E = 1. The rounds, so the reads, depend on the scores: bounded
    only through max_rounds (a RuntimeError beyond), not by a constant.
    The auction is the custom op moe_layers::balanced_assignment, so that torch.compile traces a
    BASE layer through it (fullgraph) and runs it eagerly, with these reads, inside the graph.
    """
    n_tokens, n_experts = scores_TE.shape
    if n_tokens == 0 or n_experts == 1:
        return torch.zeros(n_tokens, dtype=torch.long, device=scores_TE.device)
    return _auction_op(scores_TE.detach(), eps, max_rounds)


ROUTINGS = ("balanced", "greedy")


class ExpertLayerNorm(nn.Module):
    """E LayerNorms over d_model: `norm(x_TD, e_T)` normalises token t with the weight and bias of
    its expert e_t. Parameters: weight [E, d_model] (ones), bias [E, d_model] (zeros)."""

    def __init__(self, n_experts: int, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_experts, d_model))
        self.bias = nn.Parameter(torch.zeros(n_experts, d_model))

    def forward(self, x_TD: Tensor, e_T: Tensor) -> Tensor:
        x_hat_TD = F.layer_norm(x_TD, (x_TD.shape[-1],), eps=self.eps)
        return x_hat_TD * self.weight[e_T] + self.bias[e_T]


def _option(config, name: str) -> bool:
    # the Config of a subclass (TMoE) may not have BaseLayer's boolean options: they are off
    return getattr(config, name, False)


class BalancedAssignmentRouter(LinearRouter):
    """Top-1 by affinity x . c_e (c = `gate`, the centroids), gated by σ(x . c_e).

    train_routing: "balanced" (in training, the balanced assignment; eval is greedy) or "greedy".
    """

    def __init__(self, d_model: int, n_experts: int, *, train_routing: str) -> None:
        super().__init__(d_model, n_experts)
        self.train_routing = train_routing

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        affinity_TE = self.logits(x_TD)
        if self.training and self.train_routing == "balanced":
            e_T = balanced_assignment(affinity_TE)
        else:
            e_T = affinity_TE.detach().argmax(-1)
        idx_TK = e_T[:, None]
        gates_TK = torch.sigmoid(affinity_TE.gather(1, idx_TK))
        return Routing(idx_TK, gates_TK, count_ids(e_T, self.n_experts))


class BaseLayer(RoutedMoE):
    """BASE layer as an FFN replacement: y = layer(x), x and y [..., d_model]; top-1 routing.

    In training each token goes to the expert of the balanced assignment maximising the total
    affinity x.c_e (experts hold at most ceil(T/E) tokens, T the tokens of the call; the assignment
    carries no gradient); in eval mode to argmax_e x.c_e. The expert output is scaled by σ(x.c_e),
    through which the centroids c (`router.gate`) learn. No auxiliary loss.

    train_routing: "balanced" (the paper) or "greedy" (argmax in training too, an ablation).
    dropout, activation, n_layers (init scale), impl: as for GShardMoE. Centroids are initialised
    orthogonal with gain 0.1 (fairseq's BASE layer).
    zero_init_output: False (default: w2 ~ N(0, c²/G) as for GShardMoE) or True (w2 = 0, as
        fairseq's BASE sublayer zero-initialises its output weight). Only the weight: with
        expert_bias the output bias keeps its init, so the layer's output at initialisation is
        σ(x.c_e) b2_e, not 0, and a residual BASE block does not start as the identity (as in
        fairseq); without biases it outputs 0.
    expert_norm: False (default) or True: each expert has its own LayerNorm (weight 1, bias 0 at
        init, eps 1e-5) applied to its input, y = σ(x.c_e) FFN_e(LN_e(x)), as fairseq's BASE
        sublayer; routing and the gate σ(x.c_e) still see x itself.
    expert_bias: False (default) or True: the experts have biases, FFN_e(h) = act(h w1_e + b1_e)
        w2_e + b2_e, as fairseq's, initialised as a Linear's: b1 ~ U(±1/sqrt(d_model)),
        b2 ~ U(±1/sqrt(G)). (fairseq's weights are a Linear's too, U(±1/sqrt(fan_in)); these
        keep the init above.) `shard_experts` shards the biases with their experts.
    fairseq's BASE block: expert_norm=True, expert_bias=True, zero_init_output=True, placed with
        moe_models' moe_placement="standalone" and n_moe_layers.

    Parameters: experts.w1 [E, d_model, G], experts.w2 [E, G, d_model], router.gate [E, d_model]
    (the centroids); with expert_norm, expert_norm.weight and expert_norm.bias [E, d_model]; with
    expert_bias, experts.b1 [E, G] and experts.b2 [E, d_model]. Ignores `token_ids`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(ExpertsConfig):
        train_routing: str = "balanced"
        zero_init_output: bool = False
        expert_norm: bool = False
        expert_bias: bool = False

        def __post_init__(self) -> None:
            super().__post_init__()
            check_choice(self, "train_routing", ROUTINGS)
            check_bools(self, "zero_init_output", "expert_norm", "expert_bias")

        @property
        def biased_experts(self) -> bool:
            return self.expert_bias

        def parameter_count(self) -> ParameterCount:
            count = super().parameter_count()
            if not self.expert_norm:
                return count
            norm = 2 * self.d_model
            return ParameterCount(
                total=count.total + self.n_experts * norm, active=count.active + norm
            )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        self.expert_norm = (
            ExpertLayerNorm(c.n_experts, c.d_model) if _option(c, "expert_norm") else None
        )

    def build_router(self) -> BalancedAssignmentRouter:
        c = self.config
        return BalancedAssignmentRouter(c.d_model, c.n_experts, train_routing=c.train_routing)

    def reset_parameters(self) -> None:
        init_ffn_experts(self.experts, self.config.n_layers)
        if self.experts.bias:
            # a Linear's default bias init (fairseq's), U(±1/sqrt(fan_in))
            for bias, fan_in in (
                (self.experts.b1, self.config.d_model),
                (self.experts.b2, self.config.expert_size),
            ):
                nn.init.uniform_(bias, -(fan_in**-0.5), fan_in**-0.5)
        if _option(self.config, "zero_init_output"):
            # the output weight only, as fairseq: the output bias keeps its init
            nn.init.zeros_(self.experts.w2)
        nn.init.orthogonal_(self.router.gate, gain=0.1)

    def expert_inputs(self, x_TD: Tensor, routing: Routing) -> Tensor:
        if self.expert_norm is None:
            return x_TD
        return self.expert_norm(x_TD, routing.idx_TK[:, 0])
