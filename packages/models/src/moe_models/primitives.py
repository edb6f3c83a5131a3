"""Small pieces every architecture uses: sinusoidal position tables and the pre-LN init."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoid_table(positions: Tensor, dim: int) -> Tensor:
    """[N, dim] sinusoidal embeddings of the (float) positions [N] (sin half, then cos half)."""
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
        * (-math.log(10000.0) / dim)
    )
    angles = positions.float()[:, None] * inv_freq[None, :]
    table = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return table[:, :dim]


def init_linear(linear: nn.Linear, n_layers: int) -> None:
    """The σ-MoE code's pre-LN init: std sqrt(2 / (n_layers * fan_in)), zero bias."""
    nn.init.normal_(linear.weight, std=(2.0 / (n_layers * linear.in_features)) ** 0.5)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
