"""MoEUT (Csordás, Irie, Schmidhuber, Potts & Manning 2024): a Universal Transformer of shared
layer groups with σ-MoE feed-forward blocks and SwitchHead attention.

G = `moeut_group_size` distinct layers form a group; the model applies the group n_layers / G
times, layer i being group layer i % G with its weights (so the weights are shared across the
repeats and their gradients add up). Peri-layernorm: a LayerNorm only where a linear map feeds a
sigmoid or softmax (the σ-MoE router, the attention's queries, keys and selectors: SwitchHead's
`peri_norm`), while the residual stream, the values and the expert inputs stay raw; a final
LayerNorm before the output layer. An attention without a norm of its own (`peri_norm` not among
its fields) and an FFN other than σ-MoE get an ordinary pre-LN in front instead.

Segment memory as Transformer-XL's: each layer application also attends to its inputs of the
previous segment (held detached; `mem_len`, default seq_len; 0 for none), so the state is one
memory tensor per application, n_layers of them.

Regulariser (the authors' reading, see shared/papers.md §4): each shared layer's router
distributions are averaged over all tokens of all its repeats, p̄_g = mean softmax(z); the
auxiliary loss is weight * mean over the G layers of -H(p̄_g): "entropy" with the σ-MoE FFN's
`entropy_weight`, "attention_entropy" with the attention's (SwitchHead: both selectors, summed,
mean over heads). The layers' own per-call terms are replaced by these model-level ones.

Init: the layers' pre-LN init with n_layers = n_repeats * G, i.e. std scale sqrt(2/(n_repeats·G)).
"""

from __future__ import annotations

import dataclasses

import moe_layers
import torch
from moe_layers.sigma_moe import negative_batch_entropy, sigmoid_topk
from moe_layers.switchhead import negative_head_entropy
from torch import Tensor, nn

from moe_models.common import LanguageModel, ModelOutput
from moe_models.config import ModelConfig
from moe_models.ffn import FFNBlock


class PeriFFNBlock(FFNBlock):
    """x + Dropout(σ-MoE(x)) with the router reading LN(x) and the experts raw x; an FFN other
    than σ-MoE is an ordinary pre-LN block. Keeps the router logits of its latest call."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__(cfg, index)
        self.routed = isinstance(self.ffn, moe_layers.SigmaMoE)
        self.logits_TE: Tensor | None = None

    def forward(self, x_BLD: Tensor, token_ids_BL: Tensor) -> Tensor:
        if not self.routed:
            return super().forward(x_BLD, token_ids_BL)
        moe = self.ffn
        x_TD = x_BLD.reshape(-1, x_BLD.shape[-1])
        logits_TE = moe.router.logits(self.norm(x_BLD).reshape(x_TD.shape))
        drop_TE = None
        if self.training and moe.config.expert_dropout > 0:
            drop_TE = torch.rand_like(logits_TE, dtype=torch.float32) < moe.config.expert_dropout
        idx_TK, gates_TK, counts_E = sigmoid_topk(logits_TE, logits_TE, moe.config.k, drop_TE)
        probs_TE = torch.softmax(logits_TE.detach().float(), dim=-1)
        moe.record_routing_stats(counts_E, x_TD.shape[0], probs_TE)
        self.logits_TE = logits_TE
        y_TD = moe.experts(x_TD, idx_TK, gates_TK)
        return x_BLD + self.dropout(y_TD.view(x_BLD.shape))


class MoEUTLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        peri = "peri_norm" in {f.name for f in dataclasses.fields(cfg.attention)}
        self.attn_norm = None if peri else nn.LayerNorm(cfg.d_model)
        self.attn = cfg.attention.build()
        self.dropout = nn.Dropout(cfg.dropout)
        self.ffn = PeriFFNBlock(cfg, index)

    def forward(self, x_BLD: Tensor, mem_BMD: Tensor | None, token_ids_BL: Tensor) -> Tensor:
        h, m = x_BLD, mem_BMD
        if self.attn_norm is not None:
            h = self.attn_norm(x_BLD)
            m = None if mem_BMD is None else self.attn_norm(mem_BMD)
        x_BLD = x_BLD + self.dropout(self.attn(h, m))
        return self.ffn(x_BLD, token_ids_BL)


class MoEUT(LanguageModel):
    """state: the memory, one [B, M, d_model] tensor of layer inputs per layer application."""

    arch = "moeut"
    carries_state = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        cfg = config
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embedding.weight, std=cfg.d_model**-0.5)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(MoEUTLayer(cfg, g) for g in range(cfg.moeut_group_size))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=cfg.d_model**-0.5)
        if cfg.tie_embeddings:
            self.head.weight = self.embedding.weight

    def check_state(self, tokens: Tensor, mems) -> None:
        self.check_memory(tokens, mems, self.config.n_layers, "layer application")

    def forward(
        self, tokens: Tensor, targets: Tensor | None = None, *, state: list[Tensor] | None = None
    ) -> ModelOutput:
        self.check_tokens(tokens, targets)
        if state is not None:
            self.check_state(tokens, state)
        mem_len = self.config.memory_length
        G = len(self.layers)
        x_BLD = self.dropout(self.embedding(tokens))
        new_mems = []
        ffn_logits: list[list[Tensor]] = [[] for _ in range(G)]
        attn_logits: list[list[list[Tensor]]] = [[] for _ in range(G)]
        for i in range(self.config.n_layers):
            layer = self.layers[i % G]
            mem = None if state is None or state[i].shape[1] == 0 else state[i]
            ctx = x_BLD if mem is None else torch.cat([mem, x_BLD], dim=1)
            new_mems.append(ctx[:, max(ctx.shape[1] - mem_len, 0) :].detach())
            x_BLD = layer(x_BLD, mem, tokens)
            if layer.ffn.logits_TE is not None:
                ffn_logits[i % G].append(layer.ffn.logits_TE)
            selection = getattr(layer.attn, "selection_logits", None)
            if selection:
                attn_logits[i % G].append(list(selection))
        logits = self.head(self.norm(x_BLD))
        aux = self.stack_losses(ffn_logits, attn_logits) if self.training else {}
        return self.finish(logits, targets, state=new_mems, aux_losses=aux)

    def stack_losses(self, ffn_logits, attn_logits) -> dict[str, Tensor]:
        """The entropy regularisers over the whole stack (module docstring); SwitchHead's own
        per-call term (of its last call only) is cleared. Other layers' auxiliary losses are
        their last call's."""
        aux = {}
        ffn_weight = getattr(self.config.ffn, "entropy_weight", 0.0)
        if ffn_weight > 0 and all(ffn_logits) and ffn_logits[0][0].shape[0] > 0:
            terms = [negative_batch_entropy(torch.cat(calls)) for calls in ffn_logits]
            aux["entropy"] = ffn_weight * torch.stack(terms).mean()
        attn_weight = getattr(self.config.attention, "entropy_weight", 0.0)
        for layer in self.layers:
            if isinstance(layer.attn, moe_layers.SwitchHead):
                layer.attn._aux_losses = {}
        if attn_weight > 0 and all(attn_logits) and attn_logits[0][0][0].shape[0] > 0:
            terms = [
                sum(negative_head_entropy(torch.cat(side)) for side in zip(*calls, strict=True))
                for calls in attn_logits
            ]
            aux["attention_entropy"] = attn_weight * torch.stack(terms).mean()
        return aux
