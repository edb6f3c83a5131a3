"""HASH layer (Roller et al. 2021): each token goes to the expert a fixed hash of its token id picks.

The hash is a fixed random table vocab id -> expert drawn from `seed` at construction and stored as
a buffer (so checkpoints carry it). No gate, no auxiliary loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_layers.base import (
    ExpertsConfig,
    RoutedMoE,
    Router,
    Routing,
    check_choice,
    check_id_range,
    check_option,
    check_sizes,
    count_ids,
    is_int,
)
from moe_layers.gshard import init_ffn_experts

HASHES = ("random", "balanced")


def hash_table(vocab_size: int, n_experts: int, seed: int, kind: str) -> Tensor:
    """[vocab_size] expert of each token id: "random" draws each id's expert uniformly at random,
    "balanced" deals a random permutation of the ids out to the experts in turn (equal id counts)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randint(n_experts, (vocab_size,), generator=gen)
    perm = torch.randperm(vocab_size, generator=gen)
    table = torch.empty(vocab_size, dtype=torch.long)
    table[perm] = torch.arange(vocab_size) % n_experts
    return table


class HashRouter(Router):
    """Token id t -> expert table[t], gate 1. Buffer: table [vocab_size]."""

    def __init__(self, n_experts: int, *, vocab_size: int, seed: int, hash: str) -> None:
        super().__init__(n_experts)
        self.vocab_size = vocab_size
        self.register_buffer("table", hash_table(vocab_size, n_experts, seed, hash))

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        if token_ids_T is None:
            raise ValueError(
                "HashLayer routes by token id: call it as layer(x, token_ids=ids), "
                "ids of shape x.shape[:-1]"
            )
        ids_T = token_ids_T.long()
        check_id_range(ids_T, self.vocab_size, "token_ids", "vocab_size")
        idx_TK = self.table[ids_T][:, None]
        counts_E = count_ids(idx_TK, self.n_experts)
        return Routing(idx_TK, x_TD.new_ones(idx_TK.shape), counts_E)


class HashLayer(RoutedMoE):
    """Hash-routed top-1 MoE feed-forward layer: y = layer(x, token_ids=ids).

    x [..., d_model]; token_ids int [...] (x.shape[:-1]) in [0, vocab_size), required: the ids of
    the input tokens at those positions (Roller et al. hash the current token). The expert output
    is not gated (weight 1).

    hash: "random" (the paper's Random Hash) or "balanced" (each expert gets the same number of
        vocabulary ids). seed: of the table.
    dropout, activation, n_layers (init scale), impl: as for GShardMoE.

    Parameters: experts.w1 [E, d_model, G], experts.w2 [E, G, d_model]; buffer router.table
    [vocab_size].
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(ExpertsConfig):
        router_gate = False
        vocab_size: int
        seed: int = 0
        hash: str = "random"

        def __post_init__(self) -> None:
            super().__post_init__()
            check_sizes(self, "vocab_size")
            check_option(self, ["seed"], is_int, "an int")
            check_choice(self, "hash", HASHES)

    def build_router(self) -> HashRouter:
        c = self.config
        return HashRouter(c.n_experts, vocab_size=c.vocab_size, seed=c.seed, hash=c.hash)

    def reset_parameters(self) -> None:
        init_ffn_experts(self.experts, self.config.n_layers)
