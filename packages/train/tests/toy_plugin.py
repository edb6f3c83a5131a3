"""A layer of a user's own, loaded by the `--plugin` tests: registering it makes `ffn=toy` work."""

import dataclasses

import moe_layers
import moe_models
from torch import nn


class ToyFFN(moe_layers.MoEModule):
    """y = W2 tanh(W1 x), with an auxiliary loss `toy_l2` = l2_weight * mean(y²) in training."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(moe_layers.LayerConfig):
        width: int = 8
        l2_weight: float = 0.1

        def __post_init__(self):
            super().__post_init__()
            if not (isinstance(self.width, int) and self.width > 0):
                raise ValueError(f"width must be a positive int, got {self.width!r}")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.w1 = nn.Linear(self.config.d_model, self.config.width)
        self.w2 = nn.Linear(self.config.width, self.config.d_model)

    def forward_tokens(self, x_TD, token_ids_T):
        y_TD = self.w2(self.w1(x_TD).tanh())
        if self.training and self.config.l2_weight > 0:
            self.record_aux_loss("toy_l2", self.config.l2_weight * y_TD.pow(2).mean())
        return y_TD


moe_models.register_ffn("toy", ToyFFN.Config)
