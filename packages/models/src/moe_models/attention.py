"""Self-attention as a pluggable part of the models: its contract and the built-in attentions.

A model config names its attention like its FFN: `attention = {"type": NAME, **options}` (or a
registered name, or a config instance); `moe_models.register_attention(name, config_cls)` adds a
user's. The config class is a dataclass with a `d_model` field and a `build()`; the model fills
the fields it owns (`registry.ATTENTION_MODEL_FIELDS`: d_model, n_layers, n_heads, d_head,
attn_dropout, state_kind, peri_norm) where the class has them. A model calls its attention on the input of
the new tokens, x_BLD ([B, L, d_model], after the layer's norm where the architecture has one), and
the attention is causal: new token i sees the earlier tokens and the new tokens 0..i. What it sees
of earlier tokens is the generation state, of one of two kinds, `state_kinds` on the config class
saying which the attention serves and the architecture choosing one:

- "memory" (transformer_xl, moeut): the model keeps the memory, the inputs of earlier tokens
  [B, M, d_model] in the same space as x_BLD (or None for none), and calls
  `y_BLD = attn(x_BLD, memory_BMD)`; new token i sits at position M + i, memory row j at j.
  Positions are the attention's business (relative positions, RoPE, ...). For generation such
  an attention may also answer `y_BLD, cache = attn.extend(x_BLD, cache, keep)`: the same output
  as with the memory of the last `keep` inputs before x_BLD, the attention keeping what it needs
  of them in `cache` (None at the start; RelativeAttention keeps their keys and values, in a
  moe_models.window.Window), so that a step computes nothing again for the earlier tokens.
  Without it the model keeps the (normalised) inputs in a Window and calls the attention.
- "cache" (decoder): the attention keeps what it needs (a key/value cache) and the model only
  passes it on: `y_BLD, cache = attn(x_BLD, cache)` with cache None at the start; the attention
  also answers `attn.cached_length(cache)`, how many tokens its cache holds.

A width other than d_model is a ValueError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import moe_layers
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moe_models.primitives import init_linear, sinusoid_table
from moe_models.registry import STATE_KINDS, register_attention
from moe_models.window import Window, extend


def check_width(x: Tensor, d_model: int, what: str) -> None:
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{what} must be [B, L, d_model={d_model}], got {tuple(x.shape)}")


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """The fields every built-in attention shares (the model fills them)."""

    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_head: int = 32
    attn_dropout: float = 0.0
    state_kind: str = "memory"

    state_kinds: ClassVar[tuple[str, ...]] = STATE_KINDS

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "d_head"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.attn_dropout, int | float) and 0 <= self.attn_dropout < 1):
            raise ValueError(f"attn_dropout must be in [0, 1), got {self.attn_dropout!r}")
        if self.state_kind not in self.state_kinds:
            raise ValueError(
                f"state_kind must be one of {self.state_kinds}, got {self.state_kind!r}"
            )


@dataclass(frozen=True, kw_only=True)
class RelativeAttentionConfig(AttentionConfig):
    """Transformer-XL's relative-position attention (the transformer_xl default)."""

    state_kinds: ClassVar[tuple[str, ...]] = ("memory",)

    def build(self) -> RelativeAttention:
        return RelativeAttention(self)


@dataclass(frozen=True, kw_only=True)
class CausalAttentionConfig(AttentionConfig):
    """Multi-head causal attention with a key/value cache, no positions of its own (the
    decoder's default: its positions are added to the embeddings)."""

    state_kind: str = "cache"
    state_kinds: ClassVar[tuple[str, ...]] = ("cache",)

    def build(self) -> CausalSelfAttention:
        return CausalSelfAttention(self)


class RelativeAttention(nn.Module):
    """Relative positional attention (Dai et al. 2019): the score of query i and key j is
        (q_i + u) · k_j + (q_i + v) · W_r r(i - j),
    with r the sinusoidal embedding of the distance and u, v learned per-head biases."""

    Config = RelativeAttentionConfig
    state_kind = "memory"

    def __init__(self, cfg: RelativeAttentionConfig) -> None:
        super().__init__()
        self.d_model = cfg.d_model
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
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
        # (key, W_r r of distances 0..n-1) kept by _positions
        self._positions_cache: tuple | None = None

    def forward(self, x_BLD: Tensor, mem_BMD: Tensor | None) -> Tensor:
        check_width(x_BLD, self.d_model, "the attention input")
        if mem_BMD is not None:
            check_width(mem_BMD, self.d_model, "the attention memory")
        B, L, _ = x_BLD.shape
        ctx_BKD = x_BLD if mem_BMD is None else torch.cat([mem_BMD, x_BLD], dim=1)
        K = ctx_BKD.shape[1]
        H, Dh = self.n_heads, self.d_head
        k_BHKd = self.k(ctx_BKD).view(B, K, H, Dh).transpose(1, 2)
        v_BHKd = self.v(ctx_BKD).view(B, K, H, Dh).transpose(1, 2)
        return self._attend(x_BLD, k_BHKd, v_BHKd, self._positions(K, K, x_BLD))

    def extend(self, x_BLD: Tensor, cache: Window | None, keep: int) -> tuple[Tensor, Window]:
        """forward(x_BLD, memory) for generation, where memory is the last `keep` inputs before
        x_BLD: cache (None at the start) holds their keys and values, so that a step projects
        its new tokens only; returns the output and the cache of the next call."""
        check_width(x_BLD, self.d_model, "the attention input")
        B, L, _ = x_BLD.shape
        H, Dh = self.n_heads, self.d_head
        kv_BL2I = torch.stack([self.k(x_BLD), self.v(x_BLD)], dim=2)
        kv_BK2I, cache = extend(cache, kv_BL2I, keep)
        K = kv_BK2I.shape[1]
        k_BHKd = kv_BK2I[:, :, 0].view(B, K, H, Dh).transpose(1, 2)
        v_BHKd = kv_BK2I[:, :, 1].view(B, K, H, Dh).transpose(1, 2)
        return self._attend(x_BLD, k_BHKd, v_BHKd, self._positions(K, keep + L, x_BLD)), cache

    def _positions(self, K: int, room: int, x: Tensor) -> Tensor:
        """W_r r(d) of the distances d = K-1, ..., 1, 0 (descending): [H, K, d_head]. Without
        autograd it depends on the weights only, so it is computed once for `room` >= K distances
        and its last K rows reused (recomputed when W_r changes: an optimiser step, a load)."""
        weight = self.r.weight
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._project_positions(K, x)
        key = (weight._version, weight.data_ptr(), x.dtype, x.device)
        if (
            self._positions_cache is None
            or self._positions_cache[0] != key
            or (self._positions_cache[1].shape[1] < K)
        ):
            self._positions_cache = (key, self._project_positions(max(K, room), x))
        table_HRd = self._positions_cache[1]
        return table_HRd[:, table_HRd.shape[1] - K :]

    def _project_positions(self, K: int, x: Tensor) -> Tensor:
        dist_K = torch.arange(K - 1, -1, -1, device=x.device)
        r_KI = self.r(sinusoid_table(dist_K, self.d_model).to(x.dtype))
        return r_KI.view(K, self.n_heads, self.d_head).transpose(0, 1)

    def _attend(self, x_BLD: Tensor, k_BHKd: Tensor, v_BHKd: Tensor, r_HKd: Tensor) -> Tensor:
        """Attention of the queries of x_BLD (the last L of the K positions) over the keys."""
        B, L, _ = x_BLD.shape
        K = k_BHKd.shape[2]
        M = K - L
        H, Dh = self.n_heads, self.d_head
        q_BHLd = self.q(x_BLD).view(B, L, H, Dh).transpose(1, 2)
        # the score scale on the queries' side: d_head times fewer products than on the scores
        qv_BHLd = (q_BHLd + self.position_bias[:, None, :]) * Dh**-0.5
        # column j: distance K-1-j. Query i sits at absolute position M + i and key k at k, at
        # distance M + i - k, which is column k + L-1-i: row i is the row shifted left by L-1-i
        pos_by_column_BHLK = torch.einsum("bhld,hkd->bhlk", qv_BHLd, r_HKd)
        future_LK = (
            torch.arange(K, device=x_BLD.device)[None, :]
            > (M + torch.arange(L, device=x_BLD.device))[:, None]
        )
        # in place: the shifted rows are a fresh tensor (a view of the shift's own copy)
        bias_BHLK = shift_rows_left(pos_by_column_BHLK).masked_fill_(future_LK, float("-inf"))
        att_BHLd = F.scaled_dot_product_attention(
            q_BHLd + self.content_bias[:, None, :],
            k_BHKd,
            v_BHKd,
            attn_mask=bias_BHLK,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        return self.out(att_BHLd.transpose(1, 2).reshape(B, L, H * Dh))


def shift_rows_left(x_BHLK: Tensor) -> Tensor:
    """Row i of the last two dims shifted left by L-1-i: out[.., i, k] = x[.., i, k + L-1-i] where
    k + L-1-i < K; the entries past the end (k > K-L+i, the future of a causal query) hold other
    rows' values and must be masked. Transformer-XL's relative shift, by a zero column and views:
    unlike a gather by distance, its backward keeps no copy of x (a gather's keeps its input, one
    [B, H, L, K] tensor per layer). The result is a view of a new tensor, free to be written."""
    B, H, L, K = x_BHLK.shape
    # cat writes each value once; F.pad would fill the whole tensor with zeros first
    zeros_BHL1 = x_BHLK.new_zeros(B, H, L, 1)
    padded_BHF = torch.cat([zeros_BHL1, x_BHLK], dim=-1).view(B, H, L * (K + 1))
    return padded_BHF[:, :, L:].view(B, H, L, K)


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


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention; its cache holds the keys and values of earlier tokens, a
    moe_models.window.Window of [B, K, 2, H, d_head] (appended in place)."""

    Config = CausalAttentionConfig
    state_kind = "cache"

    def __init__(self, cfg: CausalAttentionConfig) -> None:
        super().__init__()
        self.d_model = cfg.d_model
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        inner = self.n_heads * self.d_head
        self.qkv = nn.Linear(cfg.d_model, 3 * inner)
        self.out = nn.Linear(inner, cfg.d_model)
        self.attn_dropout = cfg.attn_dropout
        init_linear(self.qkv, cfg.n_layers)
        init_linear(self.out, cfg.n_layers)

    @staticmethod
    def cached_length(cache: Window | None) -> int:
        return 0 if cache is None else len(cache)

    def forward(self, x_BLD: Tensor, past: Window | None):
        check_width(x_BLD, self.d_model, "the attention input")
        B, L, _ = x_BLD.shape
        qkv_BL3Hd = self.qkv(x_BLD).view(B, L, 3, self.n_heads, self.d_head)
        q = qkv_BL3Hd[:, :, 0].transpose(1, 2)
        if past is None:
            kv_BK2Hd = qkv_BL3Hd[:, :, 1:]
            cache = Window.of(kv_BK2Hd)
        else:
            kv_BK2Hd, cache = extend(past, qkv_BL3Hd[:, :, 1:], None)
        k, v = kv_BK2Hd[:, :, 0].transpose(1, 2), kv_BK2Hd[:, :, 1].transpose(1, 2)
        K = k.shape[2]
        # query i sits at position K - L + i and sees keys 0..K - L + i
        allowed_LK = (
            torch.arange(K, device=x_BLD.device)[None, :]
            <= (K - L + torch.arange(L, device=x_BLD.device))[:, None]
        )
        att_BHLd = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed_LK, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.out(att_BHLd.transpose(1, 2).reshape(B, L, -1)), cache


@dataclass(frozen=True, kw_only=True)
class SwitchHeadConfig(moe_layers.SwitchHead.Config):
    """moe_layers.SwitchHead as a model's attention, of either state kind: "memory" reads the
    model's memory, "cache" keeps the inputs of the earlier tokens and recomputes their keys and
    values (the value experts are chosen per token, so there is no cheaper exact cache of them
    than the inputs times the chosen projections). Defaults: the authors' 4 experts, k = 2."""

    n_experts: int = 4
    k: int = 2
    state_kind: str = "memory"

    state_kinds: ClassVar[tuple[str, ...]] = STATE_KINDS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.state_kind not in self.state_kinds:
            raise ValueError(
                f"state_kind must be one of {self.state_kinds}, got {self.state_kind!r}"
            )


class SwitchHeadAttention(moe_layers.SwitchHead):
    Config = SwitchHeadConfig

    @staticmethod
    def cached_length(cache: Tensor | None) -> int:
        return 0 if cache is None else cache.shape[1]

    def forward(self, x_BLD: Tensor, state: Tensor | None = None):
        y_BLD = super().forward(x_BLD, state)
        if self.config.state_kind == "memory":
            return y_BLD
        return y_BLD, x_BLD if state is None else torch.cat([state, x_BLD], dim=1)


BUILTIN_ATTENTIONS = {
    "relative": RelativeAttentionConfig,
    "causal": CausalAttentionConfig,
    "switchhead": SwitchHeadConfig,
}
for _name, _cls in BUILTIN_ATTENTIONS.items():
    register_attention(_name, _cls)

# the attention an architecture gets when its config names none
DEFAULT_ATTENTION = {"transformer_xl": "relative", "decoder": "causal", "moeut": "switchhead"}
# the kind of generation state each architecture keeps
ARCH_STATE_KIND = {"transformer_xl": "memory", "decoder": "cache", "moeut": "memory"}
