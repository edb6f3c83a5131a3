"""The dense feed-forward baseline with the moe_layers interface."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from moe_layers.base import (
    ACTIVATIONS,
    LayerConfig,
    MoEModule,
    ParameterCount,
    check_bools,
    check_choice,
    check_probabilities,
    check_sizes,
)


class DenseFFN(MoEModule):
    """The dense two-layer feed-forward block, the baseline: y = W2 act(W1 x + b1) + b2.

    d_ff: hidden width. dropout: on the hidden activations in training. bias: b1 and b2.
    n_layers: pre-LN init of the σ-MoE code, std sqrt(2 / (n_layers * fan_in)).
    Parameters: fc1.weight [d_ff, d_model], fc1.bias, fc2.weight [d_model, d_ff], fc2.bias.
    Ignores `token_ids`.
    """

    @dataclass(frozen=True, kw_only=True)
    class Config(LayerConfig):
        positional = ("d_model", "d_ff")
        d_ff: int
        activation: str = "relu"
        dropout: float = 0.0
        bias: bool = True
        n_layers: int = 1

        def __post_init__(self) -> None:
            super().__post_init__()
            check_sizes(self, "d_ff", "n_layers")
            check_choice(self, "activation", ACTIVATIONS)
            check_probabilities(self, "dropout")
            check_bools(self, "bias")

        def parameter_count(self) -> ParameterCount:
            n = 2 * self.d_model * self.d_ff + (self.d_ff + self.d_model if self.bias else 0)
            return ParameterCount(total=n, active=n)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        self.fc1 = nn.Linear(c.d_model, c.d_ff, bias=c.bias)
        self.fc2 = nn.Linear(c.d_ff, c.d_model, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)
        scale = (2.0 / c.n_layers) ** 0.5
        nn.init.normal_(self.fc1.weight, std=scale * c.d_model**-0.5)
        nn.init.normal_(self.fc2.weight, std=scale * c.d_ff**-0.5)
        if c.bias:
            nn.init.zeros_(self.fc1.bias)
            nn.init.zeros_(self.fc2.bias)

    def forward_tokens(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Tensor:
        return self.fc2(self.dropout(ACTIVATIONS[self.config.activation](self.fc1(x_TD))))
