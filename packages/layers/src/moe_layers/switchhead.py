"""SwitchHead (Csordás, Piękos, Irie & Schmidhuber 2024): attention whose value and output
projections are mixtures of experts, so that few heads (few attention matrices) do the work of many.

Shapes: B batch, L new tokens, M memory tokens, K = M + L context tokens, D = d_model, H heads,
d = d_head, E experts per head, k experts chosen per (token, head).

Per head h, queries and keys are dense: q = x W_Q^h, k = x W_K^h. Values and outputs are E
experts each, chosen by a non-competitive sigmoid top-k on the token: on the source side for
values, v_j^h = sum_{e in topk(s_V[j, h])} s_V[j, h, e] x_j W_V^{h,e} with s_V = sigmoid(x W_SV);
on the destination side for outputs, y_i = sum_h sum_{e in topk(s_O[i, h])} s_O[i, h, e]
a_i^h W_O^{h,e}, a^h = softmax(q^h k^hT) v^h, s_O = sigmoid(x W_SO). The gates are the raw sigmoid
values (no renormalisation over the k chosen). n_experts = 1 is plain attention with a sigmoid
gate on each head's output (the value side then has no selector).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import moe_kernels
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moe_layers.base import (
    LayerConfig,
    MoEModule,
    ParameterCount,
    check_at_most,
    check_bools,
    check_choice,
    check_non_negative,
    check_probabilities,
    check_sizes,
    compute_dtype,
    count_ids,
    is_finite,
)

POSITIONS = ("rope", "xl")


def rope_dims(d_head: int) -> int:
    """How many of a head's dimensions RoPE rotates: half of them, rounded down to even."""
    return d_head // 2 // 2 * 2


def _angle_dtype(dtype: torch.dtype) -> torch.dtype:
    # position angles in float32 at least: half precision cannot tell far positions apart
    return torch.promote_types(dtype, torch.float32)


def sinusoids(positions: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """[N, dim] sinusoidal embeddings of the positions [N] (sin half, then cos half), as
    Transformer-XL embeds its distances, computed in at least float32 and returned in dtype."""
    angle = _angle_dtype(dtype)
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, device=positions.device, dtype=angle) * (-math.log(10000.0) / dim)
    )
    angles = positions.to(angle)[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)[:, :dim].to(dtype)


def apply_rope(x_BNHd: Tensor, positions_N: Tensor, base: float) -> Tensor:
    """x rotated by RoPE on its first rope_dims(d) dimensions (rotate-half pairing: dimension i
    with i + r/2), the others left as they are."""
    r = rope_dims(x_BNHd.shape[-1])
    if r == 0:
        return x_BNHd
    angle = _angle_dtype(x_BNHd.dtype)
    inv_freq = base ** (-torch.arange(0, r, 2, device=x_BNHd.device, dtype=angle) / r)
    angles_N1f = (positions_N.to(angle)[:, None] * inv_freq[None, :])[:, None, :]
    cos, sin = angles_N1f.cos().to(x_BNHd.dtype), angles_N1f.sin().to(x_BNHd.dtype)
    a, b, rest = x_BNHd[..., : r // 2], x_BNHd[..., r // 2 : r], x_BNHd[..., r:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


def negative_head_entropy(logits_THE: Tensor) -> Tensor:
    """Mean over heads of -H(p̄_h), p̄_h the token mean of softmax(logits[:, h]) (σ-MoE's
    entropy regulariser per head, in log space, at least float32)."""
    dtype = torch.promote_types(logits_THE.dtype, torch.float32)
    log_p_THE = torch.log_softmax(logits_THE.to(dtype), dim=-1)
    n_tokens = torch.full((), logits_THE.shape[0], dtype=dtype, device=logits_THE.device)
    log_mean_HE = torch.logsumexp(log_p_THE, dim=0) - n_tokens.log()
    return (log_mean_HE.exp() * log_mean_HE).sum(-1).mean()


class SwitchHead(MoEModule):
    """SwitchHead attention; causal, over the new tokens and an optional memory of earlier ones.

    `layer(x, memory=None)`: x [B, L, d_model], memory [B, M, d_model] (the inputs of the M
    earlier tokens, e.g. Transformer-XL's memory; None: none) -> y [B, L, d_model]; new token i
    sits at position M + i and sees memory and new tokens up to itself.

    n_heads (H), d_head (d; None: d_model // n_heads), n_experts (E) and k: the sizes above.
    positions: "rope" (rotary embeddings on half of each head's dimensions, base `rope_base`) or
        "xl" (Transformer-XL relative positions: learned biases u, v and a projection of the
        sinusoidal distance embedding).
    expert_dropout: in training, each (token, head, expert) pair is removed from the selection
        with this probability before the top-k (selection only, as σ-MoE).
    entropy_weight (γ): in training, records γ * (-H(p̄)) as "attention_entropy", the mean over
        heads of the value and the output selectors' σ-MoE entropy regulariser, summed.
    attn_dropout: dropout on the attention weights in training.
    peri_norm: MoEUT's peri-layernorm: a LayerNorm of its own on the input of the queries, the
        keys and the selectors; the values read the raw input.
    n_layers (L): depth, for the pre-LN init std sqrt(2 / (L * fan_in)) (the output experts as
        the output of a dense attention of H * d inputs; selector rows renormalised as σ-MoE's).
    impl: "fast" (the expert projections through moe_kernels.expert_matmul) or "dense" (every
        expert projected with one matmul, then the chosen ones gathered: E/k times the FLOPs of
        "fast", but one large matmul, faster where E is small and the kernels' routing costs more).

    Parameters: q, k [H*d, D] (Linear), w_v [H*E, D, d], w_o [H*E, d, D] (expert h*E + e is
    expert e of head h), sel_v (E > 1) and sel_o [H*E, D]; "xl": r [H*d, D], u, v [H, d];
    peri_norm: norm. No biases.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(LayerConfig):
        positional = ("d_model", "n_heads", "n_experts", "k")
        n_heads: int
        n_experts: int
        k: int
        d_head: int | None = None
        positions: str = "rope"
        rope_base: float = 10000.0
        expert_dropout: float = 0.0
        entropy_weight: float = 0.0
        attn_dropout: float = 0.0
        peri_norm: bool = False
        n_layers: int = 1
        impl: str = "fast"

        def __post_init__(self) -> None:
            super().__post_init__()
            check_sizes(self, "n_heads", "n_experts", "k", "n_layers")
            if self.d_head is None and self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set d_head"
                )
            if self.d_head is not None:
                check_sizes(self, "d_head")
            check_at_most(self, "k", self.n_experts, "n_experts")
            check_choice(self, "positions", POSITIONS)
            check_choice(self, "impl", ("fast", "dense"))
            if not (is_finite(self.rope_base) and self.rope_base > 1):
                raise ValueError(f"rope_base must be a number > 1, got {self.rope_base!r}")
            check_probabilities(self, "expert_dropout", "attn_dropout")
            check_non_negative(self, "entropy_weight")
            check_bools(self, "peri_norm")

        @property
        def head_dim(self) -> int:
            return self.d_head if self.d_head is not None else self.d_model // self.n_heads

        def parameter_count(self) -> ParameterCount:
            D, H, E, d = self.d_model, self.n_heads, self.n_experts, self.head_dim
            selectors = (2 if E > 1 else 1) * H * E * D
            shared = 2 * D * H * d + selectors
            if self.positions == "xl":
                shared += D * H * d + 2 * H * d
            if self.peri_norm:
                shared += 2 * D
            return ParameterCount(
                total=shared + 2 * H * E * D * d, active=shared + 2 * H * self.k * D * d
            )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        D, H, E, d = c.d_model, c.n_heads, c.n_experts, c.head_dim
        self.n_heads, self.n_experts, self.d_head = H, E, d
        self.q = nn.Linear(D, H * d, bias=False)
        self.k = nn.Linear(D, H * d, bias=False)
        self.w_v = nn.Parameter(torch.empty(H * E, D, d))
        self.w_o = nn.Parameter(torch.empty(H * E, d, D))
        self.sel_v = nn.Linear(D, H * E, bias=False) if E > 1 else None
        self.sel_o = nn.Linear(D, H * E, bias=False)
        if c.positions == "xl":
            self.r = nn.Linear(D, H * d, bias=False)
            self.content_bias = nn.Parameter(torch.zeros(H, d))  # u
            self.position_bias = nn.Parameter(torch.zeros(H, d))  # v
        self.norm = nn.LayerNorm(D) if c.peri_norm else None
        # the selector logits of the latest forward, [T, H, E] each (value side first when it
        # has a selector): a model that shares this layer across depth (MoEUT) reads them to
        # regularise the routing over all the calls
        self.selection_logits: list[Tensor] = []
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.config
        D, H, d = c.d_model, c.n_heads, c.head_dim
        scale = 2.0 / c.n_layers
        with torch.no_grad():
            for lin in (self.q, self.k, getattr(self, "r", None)):
                if lin is not None:
                    nn.init.normal_(lin.weight, std=math.sqrt(scale / D))
            nn.init.normal_(self.w_v, std=math.sqrt(scale / D))
            nn.init.normal_(self.w_o, std=math.sqrt(scale / (H * d)))
            for sel in (self.sel_v, self.sel_o):
                if sel is not None:
                    nn.init.normal_(sel.weight, std=math.sqrt(scale / D))
                    # every row gets the norm a row of that std has on average (as σ-MoE's gate)
                    sel.weight.mul_(math.sqrt(scale) / sel.weight.norm(dim=-1, keepdim=True))

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        D = self.config.d_model
        if x.dim() != 3 or x.shape[-1] != D:
            raise ValueError(f"x must be [B, L, d_model={D}], got shape {tuple(x.shape)}")
        if memory is not None and (
            memory.dim() != 3 or memory.shape[-1] != D or memory.shape[0] != x.shape[0]
        ):
            raise ValueError(
                f"memory must be [B={x.shape[0]}, M, d_model={D}], got {tuple(memory.shape)}"
            )
        self._aux_losses = {}
        return self.attend(x, memory)

    def _select(self, sel: nn.Linear, n_BND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """logits [T, H, E], chosen experts idx [T, H, k] (as expert ids h*E + e) and gates."""
        H, E, k = self.n_heads, self.n_experts, self.config.k
        logits_THE = sel(n_BND.reshape(-1, n_BND.shape[-1])).view(-1, H, E)
        scores_THE = logits_THE
        drop_THE = None
        if self.training and self.config.expert_dropout > 0:
            drop_THE = torch.rand_like(logits_THE, dtype=torch.float32) < self.config.expert_dropout
            scores_THE = logits_THE.masked_fill(drop_THE, float("-inf"))
        e_THk = scores_THE.topk(k, dim=-1, sorted=False).indices
        gates_THk = torch.sigmoid(logits_THE.gather(-1, e_THk))
        if drop_THE is not None:
            gates_THk = gates_THk.masked_fill(drop_THE.gather(-1, e_THk), 0.0)
        heads_1H1 = torch.arange(H, device=n_BND.device)[None, :, None]
        return logits_THE, e_THk + heads_1H1 * E, gates_THk

    def _values(self, ctx_BKD: Tensor, n_BKD: Tensor) -> Tensor:
        B, K, D = ctx_BKD.shape
        H, d = self.n_heads, self.d_head
        dtype = compute_dtype(ctx_BKD)
        w_v = self.w_v.to(dtype)
        x_TD = ctx_BKD.reshape(-1, D).to(dtype)
        if self.sel_v is None:
            return (x_TD @ w_v.transpose(0, 1).reshape(D, H * d)).view(B, K, H, d)
        logits_THE, idx_THk, gates_THk = self._select(self.sel_v, n_BKD)
        self.selection_logits.append(logits_THE)
        idx_TS = idx_THk.flatten(1)
        if self.config.impl == "dense":
            all_TXd = (x_TD @ w_v.transpose(0, 1).reshape(D, -1)).view(-1, H * self.n_experts, d)
            rows_TSd = all_TXd.gather(1, idx_TS[..., None].expand(-1, -1, d))
        else:
            rows_TSd = moe_kernels.expert_matmul(x_TD, w_v, idx_TS)
        rows_THkd = rows_TSd.view(-1, H, self.config.k, d)
        v_THd = (rows_THkd * gates_THk.to(rows_THkd.dtype)[..., None]).sum(2)
        return v_THd.view(B, K, H, d)

    def _output(self, att_BLHd: Tensor, n_BLD: Tensor) -> Tensor:
        B, L, H, d = att_BLHd.shape
        D, k = self.config.d_model, self.config.k
        logits_THE, idx_THk, gates_THk = self._select(self.sel_o, n_BLD)
        self.selection_logits.append(logits_THE)
        # the statistics of the output side: its experts are (head, expert) pairs, h*E + e
        probs_TX = torch.softmax(logits_THE.detach().float(), -1).flatten(1) / H
        self.record_routing_stats(count_ids(idx_THk, H * self.n_experts), B * L, probs_TX)
        dtype = compute_dtype(att_BLHd)
        w_o = self.w_o.to(dtype)
        a_THd = att_BLHd.reshape(-1, H, d).to(dtype)
        idx_TS, gates_TS = idx_THk.flatten(1), gates_THk.flatten(1).to(dtype)
        if self.config.impl == "dense":
            # [T, H, d] x [H, d, E*D]: every expert of each head, then the chosen ones
            w_HdX = w_o.view(H, self.n_experts, d, D).permute(0, 2, 1, 3).reshape(H, d, -1)
            all_THED = torch.einsum("thd,hdx->thx", a_THd, w_HdX).reshape(-1, H * self.n_experts, D)
            chosen_TSD = all_THED.gather(1, idx_TS[..., None].expand(-1, -1, D))
            y_TD = (chosen_TSD * gates_TS[..., None]).sum(1)
        else:
            a_TSd = a_THd[:, :, None, :].expand(-1, H, k, d).reshape(-1, H * k, d)
            y_TD = moe_kernels.expert_matmul(a_TSd, w_o, idx_TS, gates_TS)
        return y_TD.view(B, L, D)

    def attend(self, x_BLD: Tensor, mem_BMD: Tensor | None) -> Tensor:
        c = self.config
        B, L, D = x_BLD.shape
        H, d = self.n_heads, self.d_head
        self.selection_logits = []
        ctx_BKD = x_BLD if mem_BMD is None else torch.cat([mem_BMD, x_BLD], dim=1)
        K = ctx_BKD.shape[1]
        M = K - L
        n_BKD = ctx_BKD if self.norm is None else self.norm(ctx_BKD)
        n_BLD = n_BKD[:, M:]
        q_BLHd = self.q(n_BLD).view(B, L, H, d)
        k_BKHd = self.k(n_BKD).view(B, K, H, d)
        v_BKHd = self._values(ctx_BKD, n_BKD).to(q_BLHd.dtype)
        query_pos_L = M + torch.arange(L, device=x_BLD.device)
        key_pos_K = torch.arange(K, device=x_BLD.device)
        future_LK = key_pos_K[None, :] > query_pos_L[:, None]
        if c.positions == "rope":
            q_BLHd = apply_rope(q_BLHd, query_pos_L, c.rope_base)
            k_BKHd = apply_rope(k_BKHd, key_pos_K, c.rope_base)
            bias_1LK = torch.zeros(1, L, K, dtype=q_BLHd.dtype, device=x_BLD.device)
            bias = bias_1LK.masked_fill(future_LK, float("-inf"))[:, None]
        else:
            r_HKd = self.r(sinusoids(key_pos_K, D, n_BKD.dtype)).view(K, H, d).transpose(0, 1)
            qv_BHLd = (q_BLHd + self.position_bias).transpose(1, 2)
            pos_by_dist_BHLK = torch.einsum("bhld,hkd->bhlk", qv_BHLd, r_HKd)
            dist_LK = (query_pos_L[:, None] - key_pos_K[None, :]).clamp(min=0)
            bias = pos_by_dist_BHLK.gather(-1, dist_LK.expand(B, H, L, K)) * d**-0.5
            bias = bias.masked_fill(future_LK, float("-inf"))
            q_BLHd = q_BLHd + self.content_bias
        att_BHLd = F.scaled_dot_product_attention(
            q_BLHd.transpose(1, 2),
            k_BKHd.transpose(1, 2),
            v_BKHd.transpose(1, 2),
            attn_mask=bias,
            dropout_p=c.attn_dropout if self.training else 0.0,
        )
        y_BLD = self._output(att_BHLd.transpose(1, 2), n_BLD)
        if self.training and c.entropy_weight > 0 and B * L > 0:
            reg = sum(negative_head_entropy(logits) for logits in self.selection_logits)
            self.record_aux_loss("attention_entropy", c.entropy_weight * reg)
        return y_BLD.to(x_BLD.dtype)


def reference_switchhead(layer: SwitchHead, x_BLD: Tensor, mem_BMD: Tensor | None) -> Tensor:
    """SwitchHead without dropout, one (query, head) and one (key, head) at a time: a plain loop
    that shares no code with SwitchHead's forward, to test it against."""
    c = layer.config
    B, L, D = x_BLD.shape
    H, E, d, k = c.n_heads, c.n_experts, c.head_dim, c.k
    ctx = x_BLD if mem_BMD is None else torch.cat([mem_BMD, x_BLD], dim=1)
    K = ctx.shape[1]
    M = K - L
    normed = (
        ctx
        if layer.norm is None
        else F.layer_norm(ctx, (D,), layer.norm.weight, layer.norm.bias, layer.norm.eps)
    )
    wq = layer.q.weight.view(H, d, D)
    wk = layer.k.weight.view(H, d, D)
    wv = layer.w_v.view(H, E, D, d)
    wo = layer.w_o.view(H, E, d, D)

    def chosen(weight, n_vec, h):
        """[(expert, gate)] of head h for the token n_vec: the k largest sigmoid scores."""
        logits = torch.stack([n_vec @ weight[h * E + e] for e in range(E)])
        order = sorted(range(E), key=lambda e: -float(logits[e].detach()))[:k]
        return [(e, torch.sigmoid(logits[e])) for e in order]

    def rotate(vec, pos):
        r = d // 2 // 2 * 2
        out = vec.clone()
        for i in range(r // 2):
            angle = pos * c.rope_base ** (-2 * i / r)
            cos, sin = math.cos(angle), math.sin(angle)
            out[i] = vec[i] * cos - vec[i + r // 2] * sin
            out[i + r // 2] = vec[i + r // 2] * cos + vec[i] * sin
        return out

    def distance_embedding(dist):
        angles = [dist * math.exp(i * (-math.log(10000.0) / D)) for i in range(0, D, 2)]
        table = [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
        return torch.tensor(table[:D], dtype=ctx.dtype)

    rows = []
    for b in range(B):
        values = [[None] * H for _ in range(K)]
        for j in range(K):
            for h in range(H):
                if E == 1:
                    values[j][h] = ctx[b, j] @ wv[h, 0]
                else:
                    values[j][h] = sum(
                        g * (ctx[b, j] @ wv[h, e])
                        for e, g in chosen(layer.sel_v.weight, normed[b, j], h)
                    )
        out_b = []
        for i in range(L):
            pos_i = M + i
            y = torch.zeros(D, dtype=ctx.dtype)
            for h in range(H):
                q = wq[h] @ normed[b, pos_i]
                scores = []
                for j in range(pos_i + 1):
                    key = wk[h] @ normed[b, j]
                    if c.positions == "rope":
                        s = rotate(q, pos_i) @ rotate(key, j)
                    else:
                        r_vec = layer.r.weight.view(H, d, D)[h] @ distance_embedding(pos_i - j)
                        s = (q + layer.content_bias[h]) @ key + (q + layer.position_bias[h]) @ r_vec
                    scores.append(s / math.sqrt(d))
                weights = torch.softmax(torch.stack(scores), dim=0)
                a = sum(weights[j] * values[j][h] for j in range(pos_i + 1))
                for e, g in chosen(layer.sel_o.weight, normed[b, pos_i], h):
                    y = y + g * (a @ wo[h, e])
            out_b.append(y)
        rows.append(torch.stack(out_b) if out_b else torch.zeros(0, D, dtype=ctx.dtype))
    return torch.stack(rows)
