"""A layer that turns a run non-finite on purpose (`--plugin` this file, then `ffn=poison`).

From its `at_call`-th forward pass in training on, `poison="loss"` makes its output NaN (so the
loss is), `poison="grad"` leaves the output alone and makes the gradient flowing back through it
NaN, and `poison="grad_once"` makes that gradient inf in that one pass only (an fp16 overflow
that the grad scaler skips).
"""

import dataclasses

import moe_layers
import moe_models
import torch
from torch import nn


class _BadGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, ctx.value), None


class PoisonFFN(moe_layers.MoEModule):
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(moe_layers.LayerConfig):
        at_call: int = 3
        poison: str = "loss"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.proj = nn.Linear(self.config.d_model, self.config.d_model)
        self.calls = 0

    def forward_tokens(self, x_TD, token_ids_T):
        y_TD = self.proj(x_TD)
        if not self.training:
            return y_TD
        self.calls += 1
        poison, at = self.config.poison, self.config.at_call
        if poison == "loss" and self.calls >= at:
            return y_TD * float("nan")
        if poison == "grad" and self.calls >= at:
            return _BadGrad.apply(y_TD, float("nan"))
        if poison == "grad_once" and self.calls == at:
            return _BadGrad.apply(y_TD, float("inf"))
        return y_TD


moe_models.register_ffn("poison", PoisonFFN.Config)
