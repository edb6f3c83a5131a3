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
from moe_models.window import extend

__all__ = [
    "RelativeAttention",
    "TransformerXL",
    "XLCache",
    "init_linear",
    "reference_relative_attention",
]


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

    def extend(self, x_BLD, cache, keep: int, token_ids_BL):
        """forward with the memory of the last `keep` layer inputs, for generation: the
        attention's own cache where it has `extend`, else a Window of normalised inputs."""
        h = self.attn_norm(x_BLD)
        if hasattr(self.attn, "extend"):
            a, cache = self.attn.extend(h, cache, keep)
        else:
            rows, cache = extend(cache, h, keep)
            memory = rows.shape[1] - h.shape[1]
            a = self.attn(h, rows[:, :memory] if memory else None)
        x_BLD = x_BLD + self.dropout(a)
        x_BLD = self.ffn(x_BLD, token_ids_BL)
        if self.standalone is not None:
            x_BLD = self.standalone(x_BLD, token_ids_BL)
        return x_BLD, cache


class XLCache:
    """The generation state of a TransformerXL (`init_state`): per layer what its attention
    keeps of the memory (keys and values, in place: moe_models.window), so that a step
    computes nothing again for the tokens before it. Its logits are those of the memory state."""

    def __init__(self, layers: list) -> None:
        self.layers = layers


torch.utils._pytree.register_pytree_node(
    XLCache,
    lambda c: (list(c.layers), None),
    lambda children, _: XLCache(list(children)),
    serialized_type_name="moe_models.transformer_xl.XLCache",
)


class TransformerXL(LanguageModel):
    """state: the memory, one [B, M, d_model] tensor of layer inputs per layer (detached); or,
    from `init_state` (generation), an XLCache."""

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

    def init_state(self) -> XLCache:
        """The generation state: nothing read yet."""
        return XLCache([None] * len(self.layers))

    def check_state(self, tokens: Tensor, mems: list[Tensor]) -> None:
        self.check_memory(tokens, mems, len(self.layers), "layer")

    def forward(
        self, tokens: Tensor, targets: Tensor | None = None, *, state: list[Tensor] | None = None
    ) -> ModelOutput:
        self.check_tokens(tokens, targets)
        if isinstance(state, XLCache):
            return self._extend(tokens, targets, state)
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

    def _extend(self, tokens: Tensor, targets: Tensor | None, cache: XLCache) -> ModelOutput:
        if len(cache.layers) != len(self.layers):
            raise ValueError(
                f"state must be the XLCache of this model ({len(self.layers)} layers), got one "
                f"of {len(cache.layers)}"
            )
        x_BLD = self.dropout(self.embedding(tokens))
        layers = []
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            x_BLD, layer_cache = layer.extend(x_BLD, layer_cache, self.config.memory_length, tokens)
            layers.append(layer_cache)
        logits = self.head(self.norm(x_BLD))
        return self.finish(logits, targets, state=XLCache(layers))
