"""The decoder-only (MoE) language model of Artetxe et al. 2022, after fairseq's transformer_lm.

Pre-LN Transformer, sinusoidal or learned absolute positions, token embeddings scaled by
sqrt(d_model) (fairseq's default), tied input/output embeddings, a final LayerNorm. The FFN of
layer i is the configured MoE layer (GShard top-2 in the presets) when (i + 1) % moe_interval == 0
and a dense FFN otherwise (fairseq's --moe-freq). The attention comes from the attention registry
(moe_models.attention; causal multi-head attention by default) and is of the "cache" kind: its
cache (a key/value cache by default) serves generation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_models.common import LanguageModel, ModelOutput, sinusoid_table
from moe_models.config import ModelConfig
from moe_models.ffn import FFNBlock, standalone_block


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.attn = cfg.attention.build()
        self.dropout = nn.Dropout(cfg.dropout)
        self.ffn = FFNBlock(cfg, index)
        self.standalone = standalone_block(cfg, index)

    def forward(self, x_BLD, past, token_ids_BL):
        a, kv = self.attn(self.attn_norm(x_BLD), past)
        x_BLD = x_BLD + self.dropout(a)
        x_BLD = self.ffn(x_BLD, token_ids_BL)
        if self.standalone is not None:
            x_BLD = self.standalone(x_BLD, token_ids_BL)
        return x_BLD, kv


class DecoderLM(LanguageModel):
    arch = "decoder"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        cfg = config
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embedding.weight, std=cfg.d_model**-0.5)
        self.embed_scale = cfg.d_model**0.5 if cfg.scale_embeddings else 1.0
        self.positions = (
            nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.positions == "learned" else None
        )
        if self.positions is not None:
            nn.init.normal_(self.positions.weight, std=cfg.d_model**-0.5)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embedding.weight
        else:
            nn.init.normal_(self.head.weight, std=cfg.d_model**-0.5)

    def position_embedding(self, start: int, length: int, device) -> Tensor:
        if start + length > self.config.seq_len and self.positions is not None:
            raise ValueError(
                f"positions {start}..{start + length - 1} exceed the learned position table "
                f"(seq_len={self.config.seq_len})"
            )
        pos = torch.arange(start, start + length, device=device)
        if self.positions is not None:
            return self.positions(pos)
        return sinusoid_table(pos, self.config.d_model)

    def init_state(self) -> list:
        """An empty key/value cache: the call it is given fills it and returns it."""
        return []

    def forward(
        self, tokens: Tensor, targets: Tensor | None = None, *, state: list | None = None
    ) -> ModelOutput:
        """state: None, or the attention caches of the earlier tokens, one per layer (by default
        a moe_models.window.Window of their keys and values, appended in place; [] from
        init_state: none yet); the new tokens follow them. Returns the grown caches when given
        them, else no state."""
        self.check_tokens(tokens, targets)
        past = state or None
        if past is not None and len(past) != len(self.layers):
            raise ValueError(
                f"state must be the decoder's attention caches, one per layer "
                f"({len(self.layers)}), got {len(past)} entries"
            )
        start = 0 if past is None else self.layers[0].attn.cached_length(past[0])
        x_BLD = self.embedding(tokens) * self.embed_scale
        x_BLD = self.dropout(
            x_BLD + self.position_embedding(start, tokens.shape[1], tokens.device).to(x_BLD.dtype)
        )
        cache = []
        for i, layer in enumerate(self.layers):
            x_BLD, kv = layer(x_BLD, None if past is None else past[i], tokens)
            cache.append(kv)
        logits = self.head(self.norm(x_BLD))
        return self.finish(logits, targets, state=cache if state is not None else None)
