"""The sparse all-MLP language model of Yu et al. 2022 (sMLP) and its dense gMLP baseline.

No attention. Two kinds of pre-LN residual blocks (the paper's code is not public; the layout is
the most plausible reading of the review in shared/papers.md and UNCONFIRMED):
- dense (gMLP) block: x + W_o CausalSGU(GELU(W_i LN(x))), W_i: d_model -> smlp_d_ff, the causal
  spatial gating unit halves it, W_o: smlp_d_ff / 2 -> d_model;
- sparse block: channel mixing by the configured FFN (the paper's tMoE: a BASE-routed expert layer,
  ffn type "tmoe"), x + FFN(LN(x)), then token mixing by sMoE, x + sMoE(LN(x)), whose experts are
  causal spatial projections over chunks of the hidden vector (smlp_n_chunks experts).
Block i is sparse when (i + 1) % moe_interval == 0 (the paper's split into dense and sparse
blocks is UNCONFIRMED; interleaving as in the fairseq MoE LMs is used); moe_interval=0 gives the
dense gMLP baseline. Token positions come from the spatial projections only, so the model has a
fixed window of seq_len tokens.

sMoE routing "deterministic" (chunk i -> expert i) is causal. "learned" routes on a prefix of the
sequence, which makes the prefix positions see the future: their targets are ignored in the loss
(partial prediction).
"""

from __future__ import annotations

import torch
from moe_layers import CausalSGU, SMoE
from torch import Tensor, nn
from torch.nn import functional as F

from moe_models.common import IGNORE_INDEX, LanguageModel, ModelOutput
from moe_models.config import ModelConfig
from moe_models.ffn import FFNBlock
from moe_models.transformer_xl import init_linear
from moe_models.window import Window, extend


class GMLPBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.proj_in = nn.Linear(cfg.d_model, cfg.smlp_d_ff)
        self.sgu = CausalSGU(cfg.smlp_d_ff, cfg.seq_len)
        self.proj_out = nn.Linear(cfg.smlp_d_ff // 2, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        init_linear(self.proj_in, cfg.n_layers)
        init_linear(self.proj_out, cfg.n_layers)

    def forward(self, x_BLD: Tensor, token_ids_BL: Tensor) -> Tensor:
        h = self.sgu(F.gelu(self.proj_in(self.norm(x_BLD))))
        return x_BLD + self.dropout(self.proj_out(h))


class SparseBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.channel = FFNBlock(cfg, index)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.smoe = SMoE(
            cfg.d_model,
            cfg.smlp_n_chunks,
            cfg.seq_len,
            routing=cfg.smlp_routing,
            prefix_fraction=cfg.smlp_prefix_fraction,
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BLD: Tensor, token_ids_BL: Tensor) -> Tensor:
        x_BLD = self.channel(x_BLD, token_ids_BL)
        return x_BLD + self.dropout(self.smoe(self.norm(x_BLD)))


class SparseMLPLM(LanguageModel):
    arch = "smlp"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        cfg = config
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embedding.weight, std=cfg.d_model**-0.5)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            SparseBlock(cfg, i) if cfg.is_moe_layer(i) else GMLPBlock(cfg)
            for i in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embedding.weight
        else:
            nn.init.normal_(self.head.weight, std=cfg.d_model**-0.5)
        self.prefix_len = max(
            (layer.smoe.prefix_len for layer in self.layers if isinstance(layer, SparseBlock)),
            default=0,
        )

    def init_state(self) -> Tensor:
        """No earlier tokens yet; see `forward`."""
        return torch.empty(0, 0, dtype=torch.long)

    def forward(
        self, tokens: Tensor, targets: Tensor | None = None, *, state: Tensor | None = None
    ) -> ModelOutput:
        """tokens [B, L] with L <= seq_len. state: None, or the window of earlier tokens that the
        new ones follow ([B, W], or the moe_models.window.Window a call returned: appended in
        place); the spatial projections mix absolute positions of a fixed window, so each call
        recomputes the last seq_len tokens. With a state, returns the window for the next call."""
        self.check_tokens(tokens, targets)
        seq_len = self.config.seq_len
        if not 1 <= tokens.shape[1] <= seq_len:
            raise ValueError(
                f"the sMLP LM mixes tokens over a fixed window: sequence length must be in "
                f"[1, seq_len={seq_len}], got {tokens.shape[1]}"
            )
        context, window = tokens, None
        if state is not None:
            earlier = state.buf if isinstance(state, Window) else state
            if earlier.numel() and (earlier.dim() != 2 or earlier.shape[0] != tokens.shape[0]):
                raise ValueError(
                    f"state must be the window of earlier tokens [B={tokens.shape[0]}, W], got "
                    f"{tuple(earlier.shape)}"
                )
            if not isinstance(state, Window):
                state = Window.of(state) if state.numel() else None
            rows, window = extend(state, tokens, seq_len - 1)
            context = rows[:, -seq_len:]
        x_BLD = self.dropout(self.embedding(context))
        for layer in self.layers:
            x_BLD = layer(x_BLD, context)
        logits = self.head(self.norm(x_BLD[:, -tokens.shape[1] :]))
        if targets is not None and self.prefix_len:
            # positions of the routing prefix see the future: their targets are not scored
            first_scored = max(self.prefix_len - (context.shape[1] - tokens.shape[1]), 0)
            targets = targets.clone()
            targets[:, :first_scored] = IGNORE_INDEX
        return self.finish(logits, targets, state=window)
