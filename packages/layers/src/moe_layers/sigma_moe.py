"""σ-MoE (Csordás, Irie & Schmidhuber 2023): sigmoid-gated top-K mixture of two-layer ReLU experts.

y(x) = sum over e in E(x) of sigmoid(x @ gate[e]) * relu(x @ w1[e]) @ w2[e], where E(x) holds the
K experts with the largest sigmoid scores. The gates are the raw sigmoid scores (no renormalisation
over the K chosen), so a token may use less than "one expert's worth" of output.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moe_layers.base import RoutedExperts, check_choice, check_positive, check_probability

INITS = ("dense", "expert_size")


def negative_batch_entropy(logits_TE: Tensor) -> Tensor:
    """-H(p̄) with p̄ the batch mean of softmax(logits_t): the σ-MoE entropy regulariser, unweighted.

    Computed in log space (log p̄ = logsumexp_t log_softmax(z_t) - log T) so that very peaked
    distributions do not underflow. Minimising it maximises the entropy of the batch's expert usage.
    """
    log_p_TE = torch.log_softmax(logits_TE.float(), dim=-1)
    log_mean_E = torch.logsumexp(log_p_TE, dim=0) - math.log(logits_TE.shape[0])
    return (log_mean_E.exp() * log_mean_E).sum()


def sigmoid_topk(
    scores_TE: Tensor, gate_logits_TE: Tensor, k: int, drop_mask_TE: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k experts of `scores` (with the experts in `drop_mask` removed); gates sigmoid(gate_logits).

    A token left with fewer than k experts after dropping still gets k slots; the extra slots hold a
    removed expert with gate 0, so they add nothing. Returns idx [T, k], gates [T, k] and the
    assignment count of each expert [E] (slots holding a removed expert not counted).
    """
    n_experts = scores_TE.shape[-1]
    if drop_mask_TE is not None:
        scores_TE = scores_TE.masked_fill(drop_mask_TE, float("-inf"))
    idx_TK = scores_TE.topk(k, dim=-1, sorted=False).indices
    gates_TK = torch.sigmoid(gate_logits_TE.gather(1, idx_TK))
    if drop_mask_TE is None:
        return idx_TK, gates_TK, torch.bincount(idx_TK.flatten(), minlength=n_experts)
    removed_TK = drop_mask_TE.gather(1, idx_TK)
    gates_TK = gates_TK.masked_fill(removed_TK, 0.0)
    return idx_TK, gates_TK, torch.bincount(idx_TK[~removed_TK], minlength=n_experts)


class SigmaMoE(RoutedExperts):
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
        or "expert_size" (the
        paper's "bad init" ablation: w2 std c/sqrt(G)).
    impl: "fast" (moe_kernels.expert_mlp) or "reference" (a loop over experts).

    Parameters: w1 [N_E, d_model, G], w2 [N_E, G, d_model], gate [N_E, d_model]; no biases.
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        expert_size: int,
        k: int,
        *,
        expert_dropout: float = 0.0,
        entropy_weight: float = 0.0,
        activation: str = "relu",
        n_layers: int = 1,
        dropout: float = 0.0,
        init: str = "dense",
        impl: str = "fast",
    ) -> None:
        check_positive(k=k, n_layers=n_layers)
        if k > n_experts:
            raise ValueError(f"k must be at most n_experts ({n_experts}), got {k}")
        check_probability(expert_dropout=expert_dropout)
        if not entropy_weight >= 0:
            raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight!r}")
        check_choice("init", init, INITS)
        super().__init__(d_model, n_experts, expert_size, activation, impl, hidden_dropout=dropout)
        self.k, self.expert_dropout, self.entropy_weight = k, expert_dropout, entropy_weight
        self.gate = nn.Parameter(torch.empty(n_experts, d_model))
        init_sigma_moe(self, n_layers, init)

    def route(self, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns the gate logits [T, E], idx [T, K], gates [T, K] and expert counts [E]."""
        logits_TE = x_TD @ self.gate.t()
        drop_TE = None
        if self.training and self.expert_dropout > 0:
            drop_TE = torch.rand_like(logits_TE, dtype=torch.float32) < self.expert_dropout
        # sigmoid is monotone: ranking the logits ranks the scores
        return (logits_TE, *sigmoid_topk(logits_TE, logits_TE, self.k, drop_TE))

    def forward(self, x: Tensor) -> Tensor:
        self._start_forward()
        x_TD = x.reshape(-1, self.d_model)
        logits_TE, idx_TK, gates_TK, counts_E = self.route(x_TD)
        if self.training and self.entropy_weight > 0 and x_TD.shape[0] > 0:
            self.record_aux_loss("entropy", self.entropy_weight * negative_batch_entropy(logits_TE))
        self.record_routing_stats(
            counts_E,
            n_tokens=x_TD.shape[0],
            probs_TE=torch.softmax(logits_TE.detach().float(), dim=-1),
        )
        return self.expert_forward(x_TD, idx_TK, gates_TK).reshape(x.shape)


def init_sigma_moe(layer: RoutedExperts, n_layers: int, init: str = "dense") -> None:
    """The σ-MoE dense-equivalent initialisation of w1, w2 and gate (see SigmaMoE's `init`)."""
    c = math.sqrt(2.0 / n_layers)
    n_experts, d_model, expert_size = layer.w1.shape
    width = n_experts * expert_size if init == "dense" else expert_size
    with torch.no_grad():
        nn.init.normal_(layer.w1, std=c / math.sqrt(d_model))
        nn.init.normal_(layer.w2, std=c / math.sqrt(width))
        nn.init.normal_(layer.gate, std=c / math.sqrt(d_model))
        # every row gets the norm c that a row of std c/sqrt(d_model) has on average
        layer.gate.mul_(c / layer.gate.norm(dim=-1, keepdim=True))
