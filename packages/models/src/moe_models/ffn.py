"""The pre-LN residual FFN block every architecture uses around its feed-forward layer, and the
standalone MoE block (`moe_placement="standalone"`) that may follow it."""

from __future__ import annotations

from torch import Tensor, nn

from moe_models.config import ModelConfig


class FFNBlock(nn.Module):
    """x + Dropout(FFN(LN(x))); the FFN is layer `index`'s config built, called by the layer
    contract `ffn(x, token_ids=...)` (layers that do not route on token ids ignore them)."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.ffn = cfg.layer_ffn_config(index).build()
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BLD: Tensor, token_ids_BL: Tensor) -> Tensor:
        return x_BLD + self.dropout(self.ffn(self.norm(x_BLD), token_ids=token_ids_BL))


class StandaloneBlock(nn.Module):
    """x + layer(x): a MoE layer as a residual block of its own after a layer's FFN block, on the
    un-normalised residual stream, without LayerNorm or dropout (fairseq's BASE layers)."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.layer = cfg.standalone_config(index).build()

    def forward(self, x_BLD: Tensor, token_ids_BL: Tensor) -> Tensor:
        return x_BLD + self.layer(x_BLD, token_ids=token_ids_BL)


def standalone_block(cfg: ModelConfig, index: int) -> StandaloneBlock | None:
    """Layer `index`'s standalone MoE block, if the config places one there."""
    return None if cfg.standalone_config(index) is None else StandaloneBlock(cfg, index)
