"""HASH layer (Roller et al. 2021): each token goes to the expert a fixed hash of its token id picks.

The hash is a fixed random table vocab id -> expert drawn from `seed` at construction and stored as
a buffer (so checkpoints carry it). No gate, no auxiliary loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_layers.base import RoutedExperts, check_choice, check_positive, check_probability
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


class HashLayer(RoutedExperts):
    """Hash-routed top-1 MoE feed-forward layer: y = layer(x, token_ids=ids).

    x [..., d_model]; token_ids int [...] (x.shape[:-1]) in [0, vocab_size): the ids of the input
    tokens at those positions (Roller et al. hash the current token). The expert output is not
    gated (weight 1).

    hash: "random" (the paper's Random Hash) or "balanced" (each expert gets the same number of
        vocabulary ids).
    dropout, activation, n_layers (init scale), impl: as for GShardMoE.

    Parameters: w1 [E, d_model, G], w2 [E, G, d_model]; buffer `table` [vocab_size].
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        expert_size: int,
        *,
        vocab_size: int,
        seed: int = 0,
        hash: str = "random",
        dropout: float = 0.0,
        activation: str = "relu",
        n_layers: int = 1,
        impl: str = "fast",
    ) -> None:
        super().__init__(d_model, n_experts, expert_size, activation, impl, hidden_dropout=dropout)
        check_positive(vocab_size=vocab_size, n_layers=n_layers)
        check_choice("hash", hash, HASHES)
        check_probability(dropout=dropout)
        self.vocab_size = vocab_size
        self.register_buffer("table", hash_table(vocab_size, n_experts, seed, hash))
        init_ffn_experts(self, n_layers)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        self._start_forward()
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dimension d_model={self.d_model}, got {x.shape}")
        if token_ids is None:
            raise ValueError(
                "HashLayer routes by token id: call it as layer(x, token_ids=ids), "
                "ids of shape x.shape[:-1]"
            )
        if token_ids.shape != x.shape[:-1]:
            raise ValueError(
                f"token_ids must have shape x.shape[:-1]={tuple(x.shape[:-1])}, "
                f"got {tuple(token_ids.shape)}"
            )
        if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
        ids_T = token_ids.reshape(-1).long()
        if ids_T.numel() and (int(ids_T.min()) < 0 or int(ids_T.max()) >= self.vocab_size):
            raise ValueError(
                f"token_ids must lie in [0, vocab_size={self.vocab_size}), "
                f"got values in [{int(ids_T.min())}, {int(ids_T.max())}]"
            )
        x_TD = x.reshape(-1, self.d_model)
        idx_TK = self.table[ids_T][:, None]
        gates_TK = x_TD.new_ones(idx_TK.shape)
        self.record_routing_stats(
            torch.bincount(idx_TK[:, 0], minlength=self.n_experts), len(ids_T)
        )
        return self.expert_forward(x_TD, idx_TK, gates_TK).reshape(x.shape)
