"""Pre-LN Transformer-XL language model as used by Csordás et al. (σ-MoE).

Relative positional attention (Dai et al. 2019): the score of query i and key j is
    (q_i + u) · k_j + (q_i + v) · W_r r(i - j),
with r the sinusoidal embedding of the distance and u, v learned per-head biases. Segment-level
recurrence: each layer also attends to its inputs from the previous segment(s), held detached in
a memory of `mem_len` positions. The FFN of each layer comes from the FFN registry.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moe_models.common import LanguageModel, ModelOutput, sinusoid_table
from moe_models.config import ModelConfig
from moe_models.ffn import FFNBlock, standalone_block


def init_linear(linear: nn.Linear, n_layers: int) -> None:
    """The σ-MoE code's pre-LN init: std sqrt(2 / (n_layers * fan_in)), zero bias."""
    nn.init.normal_(linear.weight, std=(2.0 / (n_layers * linear.in_features)) ** 0.5)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class RelativeAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.head_dim
        inner = self.n_heads * self.d_head
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.r = nn.Linear(cfg.d_model, inner, bias=False)
        self.out = nn.Linear(inner, cfg.d_model, bias=False)
        self.content_bias = nn.Parameter(torch.zeros(self.n_heads, self.d_head))  # u
        self.position_bias = nn.Parameter(torch.zeros(self.n_heads, self.d_head))  # v
        self.attn_dropout = cfg.attn_dropout
        for lin in (self.q, self.k, self.v, self.r, self.out):
            init_linear(lin, cfg.n_layers)

    def forward(self, x_BLD: Tensor, mem_BMD: Tensor | None) -> Tensor:
        B, L, _ = x_BLD.shape
        ctx_BKD = x_BLD if mem_BMD is None else torch.cat([mem_BMD, x_BLD], dim=1)
        K = ctx_BKD.shape[1]
        M = K - L
        H, Dh = self.n_heads, self.d_head
        q_BHLd = self.q(x_BLD).view(B, L, H, Dh).transpose(1, 2)
        k_BHKd = self.k(ctx_BKD).view(B, K, H, Dh).transpose(1, 2)
        v_BHKd = self.v(ctx_BKD).view(B, K, H, Dh).transpose(1, 2)

        # distances 0..K-1; query i sits at absolute position M + i, key j at j
        dist_K = torch.arange(K, device=x_BLD.device)
        r_HKd = self.r(sinusoid_table(dist_K, ctx_BKD.shape[-1]).to(x_BLD.dtype))
        r_HKd = r_HKd.view(K, H, Dh).transpose(0, 1)
        qv_BHLd = q_BHLd + self.position_bias[:, None, :]
        pos_by_dist_BHLK = torch.einsum("bhld,hkd->bhlk", qv_BHLd, r_HKd)
        rel_LK = (M + torch.arange(L, device=x_BLD.device))[:, None] - dist_K[None, :]
        future_LK = rel_LK < 0
        pos_BHLK = pos_by_dist_BHLK.gather(-1, rel_LK.clamp(min=0).expand(B, H, L, K))
        bias_BHLK = (pos_BHLK * Dh**-0.5).masked_fill(future_LK, float("-inf"))
        att_BHLd = F.scaled_dot_product_attention(
            q_BHLd + self.content_bias[:, None, :],
            k_BHKd,
            v_BHKd,
            attn_mask=bias_BHLK,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        return self.out(att_BHLd.transpose(1, 2).reshape(B, L, H * Dh))


def reference_relative_attention(
    attn: RelativeAttention, x_BLD: Tensor, mem_BMD: Tensor | None
) -> Tensor:
    """Readable reference of RelativeAttention.forward: the positional term is computed from the
    embedding of each (query, key) pair's distance directly, without the gather by distance, and
    attention is an explicit masked softmax. Without dropout."""
    B, L, _ = x_BLD.shape
    ctx_BKD = x_BLD if mem_BMD is None else torch.cat([mem_BMD, x_BLD], dim=1)
    K, M = ctx_BKD.shape[1], ctx_BKD.shape[1] - L
    H, Dh = attn.n_heads, attn.d_head
    q_BLHd = attn.q(x_BLD).view(B, L, H, Dh)
    k_BKHd = attn.k(ctx_BKD).view(B, K, H, Dh)
    v_BKHd = attn.v(ctx_BKD).view(B, K, H, Dh)
    query_pos_L = M + torch.arange(L, device=x_BLD.device)
    dist_LK = query_pos_L[:, None] - torch.arange(K, device=x_BLD.device)[None, :]
    r_LKD = sinusoid_table(dist_LK.clamp(min=0).flatten(), ctx_BKD.shape[-1]).view(L, K, -1)
    r_LKHd = attn.r(r_LKD.to(x_BLD.dtype)).view(L, K, H, Dh)
    content_BHLK = torch.einsum("blhd,bkhd->bhlk", q_BLHd + attn.content_bias, k_BKHd)
    position_BHLK = torch.einsum("blhd,lkhd->bhlk", q_BLHd + attn.position_bias, r_LKHd)
    scores_BHLK = (content_BHLK + position_BHLK) * Dh**-0.5
    scores_BHLK = scores_BHLK.masked_fill(dist_LK < 0, float("-inf"))
    att_BLHd = torch.einsum("bhlk,bkhd->blhd", scores_BHLK.softmax(-1), v_BKHd)
    return attn.out(att_BLHd.reshape(B, L, H * Dh))


class XLLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.attn = RelativeAttention(cfg)
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
