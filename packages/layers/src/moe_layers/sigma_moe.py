"""σ-MoE (Csordás, Irie & Schmidhuber 2023): sigmoid-gated top-K mixture of two-layer ReLU experts.

y(x) = sum over e in E(x) of sigmoid(x @ gate[e]) * relu(x @ w1[e]) @ w2[e], where E(x) holds the
K experts with the largest sigmoid scores. The gates are the raw sigmoid scores (no renormalisation
over the K chosen), so a token may use less than "one expert's worth" of output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe_layers.base import (
    ExpertsConfig,
    LinearRouter,
    RoutedMoE,
    Routing,
    TopK,
    check_choice,
    check_non_negative,
    check_probabilities,
    count_ids,
    records_routing_stats,
)

INITS = ("dense", "expert_size")


def negative_batch_entropy(logits_TE: Tensor) -> Tensor:
    """-H(p̄) with p̄ the batch mean of softmax(logits_t): the σ-MoE entropy regulariser, unweighted.

    Computed in log space (log p̄ = logsumexp_t log_softmax(z_t) - log T) so that very peaked
    distributions do not underflow, in the logits' precision but at least float32 (half-precision
    logits are promoted, float64 ones stay float64). Minimising it maximises the entropy of the
    batch's expert usage.
    """
    dtype = torch.promote_types(logits_TE.dtype, torch.float32)
    log_p_TE = torch.log_softmax(logits_TE.to(dtype), dim=-1)
    # log T as a tensor: math.log of the token count would specialise a compiled graph to it
    n_tokens = torch.full((), logits_TE.shape[0], dtype=dtype, device=logits_TE.device)
    log_mean_E = torch.logsumexp(log_p_TE, dim=0) - n_tokens.log()
    return (log_mean_E.exp() * log_mean_E).sum()


def sigmoid_topk(
    scores_TE: Tensor, gate_logits_TE: Tensor, k: int, drop_mask_TE: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Top-k experts of `scores` (with the experts in `drop_mask` removed); gates sigmoid(gate_logits).

    A token left with fewer than k experts after dropping still gets k slots; the extra slots hold a
    removed expert with gate 0, so they add nothing. Returns idx [T, k], gates [T, k] and the
    assignment count of each expert [E] (slots holding a removed expert not counted; None
    without dropping inside `without_routing_stats()`).
    """
    n_experts = scores_TE.shape[-1]
    if drop_mask_TE is not None:
        scores_TE = scores_TE.masked_fill(drop_mask_TE, float("-inf"))
    idx_TK = scores_TE.topk(k, dim=-1, sorted=False).indices
    gates_TK = torch.sigmoid(gate_logits_TE.gather(1, idx_TK))
    if drop_mask_TE is None:
        # the counts are read by the routing statistics alone (None: not recorded, see
        # moe_layers.without_routing_stats)
        counts_E = count_ids(idx_TK, n_experts) if records_routing_stats() else None
        return idx_TK, gates_TK, counts_E
    removed_TK = drop_mask_TE.gather(1, idx_TK)
    gates_TK = gates_TK.masked_fill(removed_TK, 0.0)
    return idx_TK, gates_TK, count_ids(idx_TK, n_experts, keep=~removed_TK)


@dataclass(frozen=True, kw_only=True)
class SigmoidRouterOptions(ExpertsConfig, TopK):
    """The Config of a layer routed by SigmoidTopKRouter (σ-MoE and S-BASE): the experts, k, and
    the router's regularisers expert_dropout (δ) and entropy_weight (γ); see SigmaMoE."""

    expert_dropout: float = 0.0
    entropy_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probabilities(self, "expert_dropout")
        check_non_negative(self, "entropy_weight")

    def router_options(self) -> dict:
        """SigmoidTopKRouter's arguments."""
        return dict(
            k=self.k, expert_dropout=self.expert_dropout, entropy_weight=self.entropy_weight
        )


class SigmoidTopKRouter(LinearRouter):
    """σ-MoE's router: the K experts of largest x @ gate.T, gated by their sigmoid.

    expert_dropout: in training, each (token, expert) pair is removed from the selection with this
    probability first. entropy_weight: in training, the aux loss "entropy" = weight * (-H(p̄)).
    Subclasses change only which scores rank the experts (`selection_scores`).
    """

    def __init__(
        self, d_model: int, n_experts: int, k: int, *, expert_dropout: float, entropy_weight: float
    ) -> None:
        super().__init__(d_model, n_experts)
        self.k, self.expert_dropout, self.entropy_weight = k, expert_dropout, entropy_weight

    def selection_scores(self, logits_TE: Tensor, seq_len: int | None = None) -> Tensor:
        # sigmoid is monotone: ranking the logits ranks the scores
        return logits_TE

    def forward(
        self, x_TD: Tensor, token_ids_T: Tensor | None = None, seq_len: int | None = None
    ) -> Routing:
        """seq_len: the T tokens are sequences of seq_len consecutive tokens (None: not known),
        for a subclass whose selection depends on them."""
        logits_TE = self.logits(x_TD)
        scores_TE, drop_TE = self.selection_scores(logits_TE, seq_len), None
        if self.training and self.expert_dropout > 0:
            drop_TE = torch.rand_like(scores_TE, dtype=torch.float32) < self.expert_dropout
        idx_TK, gates_TK, counts_E = sigmoid_topk(scores_TE, logits_TE, self.k, drop_TE)
        aux = {}
        if self.training and self.entropy_weight > 0 and x_TD.shape[0] > 0:
            aux["entropy"] = self.entropy_weight * negative_batch_entropy(logits_TE)
        probs_TE = None
        if records_routing_stats():
            probs_TE = torch.softmax(logits_TE.detach().float(), dim=-1)
        return Routing(idx_TK, gates_TK, counts_E, probs_TE=probs_TE, aux_losses=aux)


def init_sigma_moe(
    layer: RoutedMoE,
    n_layers: int,
    init: str = "dense",
    *,
    init_scale: float = 1.0,
    normalize_gate_rows: bool = True,
) -> None:
    """The σ-MoE dense-equivalent initialisation of w1, w2 and gate (see SigmaMoE's `init`).

    init_scale multiplies the variance of all three (c = sqrt(init_scale * 2 / n_layers), the
    authors' `moe.init_scale`); normalize_gate_rows=False leaves the gate rows as drawn.
    """
    c = math.sqrt(init_scale * 2.0 / n_layers)
    w1, w2, gate = layer.experts.w1, layer.experts.w2, layer.router.gate
    n_experts, d_model, expert_size = w1.shape
    width = n_experts * expert_size if init == "dense" else expert_size
    with torch.no_grad():
        nn.init.normal_(w1, std=c / math.sqrt(d_model))
        nn.init.normal_(w2, std=c / math.sqrt(width))
        nn.init.normal_(gate, std=c / math.sqrt(d_model))
        if normalize_gate_rows:
            # every row gets the norm c that a row of std c/sqrt(d_model) has on average
            gate.mul_(c / gate.norm(dim=-1, keepdim=True))


class SigmaMoE(RoutedMoE):
    """σ-MoE feed-forward layer; drop-in for a Transformer FFN: y = layer(x), x and y [..., d_model].

    d_model, n_experts (N_E), expert_size (G), k (K): the paper's sizes; K*G is the active width.
    expert_dropout (δ): in training, each (token, expert) pair is removed from the selection with
        probability δ before the top-K (selection only: no rescaling, the output is not masked).
    entropy_weight (γ): in training, records γ * (-H(p̄)) under the name "entropy", p̄ the batch mean
        of softmax(x @ gate.T) over tokens (softmax of the raw logits, as the authors' code does,
        although routing uses sigmoid); nothing is recorded when γ = 0.
    activation: the experts' nonlinearity ("relu" in the paper).
    n_layers (L): depth of the network, for the pre-LN init scale c = sqrt(2/L); the authors'
        post-LN models use c = 1, which n_layers=2 gives.
    dropout: dropout on the expert hidden activations (off in the paper's main runs).
    init: "dense" (the paper's dense-equivalent init: w1 ~ N(0, c²/d_model), w2 ~ N(0, c²/(N_E*G))
        as the second matrix of a dense layer of width N_E*G, gate rows ~ N(0, c²/d_model) then
        normalised to equal norm, the norm c a row of that std has, so the matrix keeps its std)
        or "expert_size" (the paper's "bad init" ablation: w2 std c/sqrt(G)).
    impl: "fast" (moe_kernels.expert_mlp) or "reference" (a loop over experts).

    Parameters: experts.w1 [N_E, d_model, G], experts.w2 [N_E, G, d_model], router.gate
    [N_E, d_model]; no biases. Ignores `token_ids`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(SigmoidRouterOptions):
        init: str = "dense"

        def __post_init__(self) -> None:
            super().__post_init__()
            check_choice(self, "init", INITS)

    def build_router(self) -> SigmoidTopKRouter:
        c = self.config
        return SigmoidTopKRouter(c.d_model, c.n_experts, **c.router_options())

    def reset_parameters(self) -> None:
        init_sigma_moe(self, self.config.n_layers, self.config.init)
