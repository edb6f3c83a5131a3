"""The decoder-only (MoE) language model of Artetxe et al. 2022, after fairseq's transformer_lm.

Pre-LN Transformer, sinusoidal or learned absolute positions, token embeddings scaled by
sqrt(d_model) (fairseq's default), tied input/output embeddings, a final LayerNorm. The FFN of
layer i is the configured MoE layer (GShard top-2 in the presets) when (i + 1) % moe_interval == 0
and a dense FFN otherwise (fairseq's --moe-freq). A key/value cache serves generation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moe_models.common import LanguageModel, ModelOutput, sinusoid_table
from moe_models.config import ModelConfig
from moe_models.ffn import FFNBlock, standalone_block
from moe_models.transformer_xl import init_linear


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.head_dim
        inner = self.n_heads * self.d_head
        self.qkv = nn.Linear(cfg.d_model, 3 * inner)
        self.out = nn.Linear(inner, cfg.d_model)
        self.attn_dropout = cfg.attn_dropout
        init_linear(self.qkv, cfg.n_layers)
        init_linear(self.out, cfg.n_layers)

    def forward(self, x_BLD: Tensor, past: tuple[Tensor, Tensor] | None):
        B, L, _ = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(B, L, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        K = k.shape[2]
        # query i sits at position K - L + i and sees keys 0..K - L + i
        allowed_LK = (
            torch.arange(K, device=x_BLD.device)[None, :]
            <= (K - L + torch.arange(L, device=x_BLD.device))[:, None]
        )
        att_BHLd = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed_LK, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.out(att_BHLd.transpose(1, 2).reshape(B, L, -1)), (k, v)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
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
        """state: None, or the key/value cache, one (k, v) [B, H, K, d_head] pair per layer, of
        the earlier tokens ([] from init_state: none yet); the new tokens follow them. Returns
        the grown cache when given one, else no state."""
        self.check_tokens(tokens, targets)
        past = state or None
        if past is not None and len(past) != len(self.layers):
            raise ValueError(
                f"state must be the decoder's key/value cache, one (k, v) per layer "
                f"({len(self.layers)}), got {len(past)} entries"
            )
        start = 0 if past is None else past[0][0].shape[2]
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
