"""Blocks of the sparse all-MLP LM (Yu et al. 2022, "Efficient Language Modeling with Sparse
all-MLP", arXiv 2203.06850) and of its dense gMLP baseline.

The paper's code is not public and its text was only available through a review (see
shared/papers.md §3), so this module implements the most plausible reading; parts marked
UNCONFIRMED are guesses, with the alternative as an option where one is sensible.

- `TMoE`: the paper's tMoE, token-wise routing for the channel-mixing (feature) MLP, BASE-layer
  style ("routing" "base": balanced assignment in training, greedy at inference).
- `SMoE`: the paper's sMoE, replacing the spatial gating unit: the hidden dimension of each token
  is split into chunks, each chunk goes to one expert, and an expert is a causal token-mixing map
  over the sequence (an expert = a gMLP spatial projection [T, T] on its chunk: UNCONFIRMED).
  Routing chunk i -> expert i (the paper's deterministic routing, default; chunk count = expert
  count: UNCONFIRMED), or learned from a prefix of the sequence with the loss taken on the rest
  only (the paper's partial prediction; prefix ~20%: UNCONFIRMED).
- `CausalSGU`: gMLP's spatial gating unit with a causal (lower-triangular) spatial projection.
  A building block of the dense gMLP baseline rather than an FFN replacement: it maps
  [..., T, d_ffn] -> [..., T, d_ffn // 2], so its Config (fields d_ffn, seq_len) is a
  `ModuleConfig`, not a `LayerConfig`, and it is no `MoEModule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe_layers.base import (
    IMPLS,
    ConfiguredModule,
    ExpertsConfig,
    LayerConfig,
    ModuleConfig,
    MoEModule,
    ParameterCount,
    check_choice,
    check_option,
    check_sizes,
    count_ids,
    is_finite,
)
from moe_layers.base_layer import BalancedAssignmentRouter, BaseLayer

TMOE_ROUTINGS = {"base": "balanced", "top1": "greedy"}
SMOE_ROUTINGS = ("deterministic", "learned")


class TMoE(BaseLayer):
    """tMoE: token-routed channel-mixing MoE (a BASE layer); y = layer(x), x and y [..., d_model].

    routing: "base" (balanced assignment in training, greedy top-1 at inference; the paper's
        BASE-style routing) or "top1" (greedy top-1 in training too, an ablation).
    Other arguments as BaseLayer. Token-wise, so inputs of any length are routed alike, but in
    training the balanced assignment is over all tokens of the call (a batch's other sequences
    and later positions influence a token's expert, as in the BASE layer; eval is token-local).
    Parameters: experts.w1 [E, d_model, G], experts.w2 [E, G, d_model], router.gate [E, d_model].
    Ignores `token_ids`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(ExpertsConfig):
        routing: str = "base"

        def __post_init__(self) -> None:
            super().__post_init__()
            check_choice(self, "routing", TMOE_ROUTINGS)

    def build_router(self) -> BalancedAssignmentRouter:
        c = self.config
        return BalancedAssignmentRouter(
            c.d_model, c.n_experts, train_routing=TMOE_ROUTINGS[c.routing]
        )


def causal_mix(weight_ETT: Tensor, bias_ET: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """The causal spatial projections of the first `length` positions: lower triangle of W, b."""
    w_ELL = torch.tril(weight_ETT[:, :length, :length])
    return w_ELL, bias_ET[:, :length]


def _check_length(x: Tensor, seq_len: int, width_name: str) -> None:
    if x.dim() < 2:
        raise ValueError(f"x must be [..., T, {width_name}], got shape {tuple(x.shape)}")
    if not 1 <= x.shape[-2] <= seq_len:
        raise ValueError(
            f"sequence length (x.shape[-2]) must be in [1, seq_len={seq_len}], got {x.shape[-2]}"
        )


class CausalSGU(ConfiguredModule):
    """gMLP's spatial gating unit, causal: [..., T, d_ffn] -> [..., T, d_ffn // 2].

    u, v = split(x); out = u * (W LN(v) + b), W [seq_len, seq_len] lower-triangular so position t
    mixes positions <= t only; W ~ U(-eps, eps) with eps = 1e-3 / seq_len and b = 1 at init, so the
    unit starts as out ≈ u (gMLP's init). A sequence shorter than seq_len (T < seq_len) uses the
    top-left T x T block: its outputs equal those of the same positions in a longer sequence.
    Not an FFN replacement (the width halves): its Config is a ModuleConfig with d_ffn, no d_model.
    Parameters: norm.weight, norm.bias [d_ffn // 2], weight [seq_len, seq_len], bias [seq_len].
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(ModuleConfig):
        positional = ("d_ffn", "seq_len")
        d_ffn: int
        seq_len: int

        def __post_init__(self) -> None:
            check_sizes(self, "d_ffn", "seq_len")
            if self.d_ffn % 2:
                raise ValueError(f"d_ffn must be even (split into u and v), got {self.d_ffn}")

        def parameter_count(self) -> ParameterCount:
            n = self.d_ffn + self.seq_len**2 + self.seq_len
            return ParameterCount(total=n, active=n)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        self.norm = nn.LayerNorm(c.d_ffn // 2)
        self.weight = nn.Parameter(torch.empty(c.seq_len, c.seq_len))
        self.bias = nn.Parameter(torch.ones(c.seq_len))
        nn.init.uniform_(self.weight, -1e-3 / c.seq_len, 1e-3 / c.seq_len)

    def forward(self, x: Tensor) -> Tensor:
        d_ffn = self.config.d_ffn
        if x.dim() == 0 or x.shape[-1] != d_ffn:
            raise ValueError(
                f"x must have last dimension d_ffn={d_ffn}, got shape {tuple(x.shape)}"
            )
        _check_length(x, self.config.seq_len, "d_ffn")
        u, v = x.chunk(2, dim=-1)
        w_1LL, b_1L = causal_mix(self.weight[None], self.bias[None], x.shape[-2])
        mixed = torch.einsum("ts,...sc->...tc", w_1LL[0], self.norm(v)) + b_1L[0, :, None]
        return u * mixed


class SMoE(MoEModule):
    """sMoE: hidden-dimension chunks routed to causal token-mixing experts (spatial gating).

    x [..., T, d_model] -> [..., T, d_model], T <= seq_len. The channels are split into n_experts
    chunks of d_model / n_experts; the chunk routed to expert e is gated as in gMLP's SGU:
    out_c = x_c * (W_e x_c + b_e), W_e [seq_len, seq_len] lower-triangular (position t mixes
    positions <= t), W_e ~ U(-eps, eps) (eps = 1e-3 / seq_len), b_e = 1, so an expert starts as the
    identity. The gating by x itself (u = the routed chunk rather than a separate half of the
    channels as in gMLP) keeps d_model unchanged: UNCONFIRMED.

    routing:
      "deterministic" (default; the paper's sMLP-deterministic): chunk i -> expert i, no gate; fully
          causal, so `loss_mask(T)` is all True and a shorter sequence's outputs equal those of
          the same positions of a longer one.
      "learned": every channel d of every sequence is routed on its own (a chunk of one channel)
          by softmax(gate @ x[:P, d]) over experts, top-1, its output scaled by that probability,
          where P = ceil(prefix_fraction * seq_len) is the routing prefix. Only positions >= P are
          causal (they depend on x[<= t] only), so the LM loss must skip positions < P (the
          paper's partial prediction): use `loss_mask(T)`. T must be >= P. Routing per channel
          rather than per chunk: UNCONFIRMED.
    prefix_fraction: in (0, 1); used by "learned" routing only.
    impl: "fast" (batched einsums) or "reference" (a loop over experts).

    Parameters: weight [E, seq_len, seq_len], bias [E, seq_len]; gate [E, P] when learned.
    No auxiliary loss. Routing statistics count (sequence, chunk) assignments per expert.
    Ignores `token_ids`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(LayerConfig):
        positional = ("d_model", "n_experts", "seq_len")
        n_experts: int
        seq_len: int
        routing: str = "deterministic"
        prefix_fraction: float = 0.2
        impl: str = "fast"

        def __post_init__(self) -> None:
            super().__post_init__()
            check_sizes(self, "n_experts", "seq_len")
            check_choice(self, "routing", SMOE_ROUTINGS)
            check_option(
                self, ["prefix_fraction"], lambda v: is_finite(v) and 0 < v < 1, "in (0, 1)"
            )
            check_choice(self, "impl", IMPLS)
            if self.routing == "deterministic" and self.d_model % self.n_experts:
                raise ValueError(
                    f"deterministic routing splits d_model={self.d_model} into "
                    f"n_experts={self.n_experts} equal chunks: d_model must be divisible by "
                    "n_experts"
                )

        @property
        def prefix_len(self) -> int:
            """P, the routing prefix of learned routing (0 for deterministic routing)."""
            if self.routing != "learned":
                return 0
            return math.ceil(self.prefix_fraction * self.seq_len)

        def parameter_count(self) -> ParameterCount:
            n = self.n_experts * (self.seq_len**2 + self.seq_len + self.prefix_len)
            return ParameterCount(total=n, active=n)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        self.weight = nn.Parameter(torch.empty(c.n_experts, c.seq_len, c.seq_len))
        self.bias = nn.Parameter(torch.ones(c.n_experts, c.seq_len))
        nn.init.uniform_(self.weight, -1e-3 / c.seq_len, 1e-3 / c.seq_len)
        if c.routing == "learned":
            self.gate = nn.Parameter(torch.empty(c.n_experts, self.prefix_len))
            nn.init.normal_(self.gate, std=self.prefix_len**-0.5)

    @property
    def prefix_len(self) -> int:
        return self.config.prefix_len

    def loss_mask(self, length: int) -> Tensor:
        """[length] bool: positions whose output is causal, on which the LM loss may be taken."""
        return torch.arange(length) >= self.prefix_len

    def forward_batch(self, x: Tensor, token_ids: Tensor | None) -> Tensor:
        c = self.config
        _check_length(x, c.seq_len, "d_model")
        length = x.shape[-2]
        if length < self.prefix_len:
            raise ValueError(
                f"learned routing needs the whole routing prefix: sequence length {length} < "
                f"prefix_len={self.prefix_len}"
            )
        x_BLD = x.reshape(-1, length, c.d_model)
        w_ELL, b_EL = causal_mix(self.weight, self.bias, length)
        if c.routing == "deterministic":
            y_BLD = self._deterministic(x_BLD, w_ELL, b_EL)
            chunks = torch.full((c.n_experts,), x_BLD.shape[0], dtype=torch.long, device=x.device)
            self.record_routing_stats(chunks, x_BLD.shape[0] * length)
        else:
            y_BLD = self._learned(x_BLD, w_ELL, b_EL)
        return y_BLD.reshape(x.shape)

    def _deterministic(self, x_BLD: Tensor, w_ELL: Tensor, b_EL: Tensor) -> Tensor:
        n_batch, length, d_model = x_BLD.shape
        n_experts = self.config.n_experts
        x_BLEC = x_BLD.reshape(n_batch, length, n_experts, -1)
        if self.config.impl == "reference":
            chunk = d_model // n_experts
            outs = []
            for e in range(n_experts):
                x_BLC = x_BLD[..., e * chunk : (e + 1) * chunk]
                mixed_BLC = w_ELL[e] @ x_BLC + b_EL[e][:, None]
                outs.append(x_BLC * mixed_BLC)
            return torch.cat(outs, dim=-1)
        mixed_BLEC = torch.einsum("ets,bsec->btec", w_ELL, x_BLEC) + b_EL.t()[None, :, :, None]
        return (x_BLEC * mixed_BLEC).reshape(x_BLD.shape)

    def _learned(self, x_BLD: Tensor, w_ELL: Tensor, b_EL: Tensor) -> Tensor:
        n_experts = self.config.n_experts
        logits_BDE = torch.einsum("bpd,ep->bde", x_BLD[:, : self.prefix_len], self.gate)
        probs_BDE = torch.softmax(logits_BDE.float(), dim=-1).to(x_BLD.dtype)
        e_BD = probs_BDE.detach().argmax(-1)
        g_BD = probs_BDE.gather(-1, e_BD[..., None]).squeeze(-1)
        counts_E = count_ids(e_BD, n_experts)
        self.record_routing_stats(
            counts_E, x_BLD.shape[0] * x_BLD.shape[1], probs_BDE.reshape(-1, n_experts)
        )
        if self.config.impl == "reference":
            mixed_BLD = torch.zeros_like(x_BLD)
            for e in range(n_experts):
                sel_B1D = (e_BD == e)[:, None, :]
                mixed_BLD = mixed_BLD + sel_B1D * (w_ELL[e] @ x_BLD + b_EL[e][:, None])
        else:
            mixed_BLDE = torch.einsum("ets,bsd->btde", w_ELL, x_BLD) + b_EL.t()[None, :, None, :]
            mixed_BLD = mixed_BLDE.gather(
                -1, e_BD[:, None, :, None].expand(-1, x_BLD.shape[1], -1, 1)
            ).squeeze(-1)
        return x_BLD * g_BD[:, None, :] * mixed_BLD
