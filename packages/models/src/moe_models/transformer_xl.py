"""Pre-LN Transformer-XL language model as used by Csordás et al. (σ-MoE).

Relative positional attention (Dai et al. 2019): the score of query i and key j is
    (q_i + u) · k_j + (q_i + v) · W_r r(i - j),
with r the sinusoidal embedding of the distance and u, v learned per-head biases. Segment-level
recurrence: each layer also attends to its inputs from the previous segment(s), held detached in
a memory of `mem_len` positions. The attention (relative attention by default) and the FFN of each
layer come from their registries (moe_models.attention, moe_models.registry); the attention is of
the "memory" kind: the model holds the memory of layer inputs and hands it, normalised, to it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_models.attention import RelativeAttention, reference_relative_attention
from moe_models.common import LanguageModel, ModelOutput
from moe_models.config import ModelConfig
from moe_models.ffn import FFNBlock, standalone_block
from moe_models.primitives import init_linear

__all__ = ["RelativeAttention", "TransformerXL", "init_linear", "reference_relative_attention"]


class XLLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.attn = cfg.attention.build()
        self.dropout = nn.Dropout(cfg.dropout)
        self.ffn = FFNBlock(cfg, index)
        self.standalone = standalone_block(cfg, index)

    def forward(self, x_BLD, mem_BMD, token_ids_BL):
        h = self.attn_norm(x_BLD)
        # the memory holds layer inputs; normalise it with the same LayerNorm
        m = None if mem_BMD is None else self.attn_norm(mem_BMD)
        x_BLD = x_BLD + self.dropout(self.attn(h, m))
        x_BLD = self.ffn(x_BLD, token_ids_BL)
        if self.standalone is not None:
            x_BLD = self.standalone(x_BLD, token_ids_BL)
        return x_BLD


class TransformerXL(LanguageModel):
    """state: the memory, one [B, M, d_model] tensor of layer inputs per layer (detached)."""

    arch = "transformer_xl"
    carries_state = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        cfg = config
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embedding.weight, std=cfg.d_model**-0.5)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(XLLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        nn.init.normal_(self.head.weight, std=cfg.d_model**-0.5)
        nn.init.zeros_(self.head.bias)
        if cfg.tie_embeddings:
            self.head.weight = self.embedding.weight

    def check_state(self, tokens: Tensor, mems: list[Tensor]) -> None:
        if not isinstance(mems, list | tuple) or len(mems) != len(self.layers):
            raise ValueError(
                f"state must be the memory of the previous segment, one tensor per layer "
                f"({len(self.layers)}), got {type(mems).__name__} of length "
                f"{len(mems) if isinstance(mems, list | tuple) else '-'}"
            )
        if any(m.shape[0] != tokens.shape[0] or m.shape[-1] != self.config.d_model for m in mems):
            raise ValueError(
                f"state must be [B={tokens.shape[0]}, M, d_model={self.config.d_model}] tensors "
                f"(the .state of the previous segment of the same batch), got "
                f"{tuple(mems[0].shape)}"
            )

    def forward(
        self, tokens: Tensor, targets: Tensor | None = None, *, state: list[Tensor] | None = None
    ) -> ModelOutput:
        self.check_tokens(tokens, targets)
        if state is not None:
            self.check_state(tokens, state)
        mem_len = self.config.memory_length
        x_BLD = self.dropout(self.embedding(tokens))
        new_mems = []
        for i, layer in enumerate(self.layers):
            mem = None if state is None or state[i].shape[1] == 0 else state[i]
            ctx = x_BLD if mem is None else torch.cat([mem, x_BLD], dim=1)
            new_mems.append(ctx[:, max(ctx.shape[1] - mem_len, 0) :].detach())
            x_BLD = layer(x_BLD, mem, tokens)
        logits = self.head(self.norm(x_BLD))
        return self.finish(logits, targets, state=new_mems)
