"""The dense feed-forward baseline with the moe_layers interface."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from moe_layers.base import (
    ACTIVATIONS,
    GATED_ACTIVATIONS,
    LayerConfig,
    MoEModule,
    ParameterCount,
    check_bools,
    check_choice,
    check_probabilities,
    check_sizes,
)

DENSE_ACTIVATIONS = (*ACTIVATIONS, *GATED_ACTIVATIONS)


def dense_parameters(d_model: int, d_ff: int, bias: bool, glu: bool) -> int:
    """Parameters of a dense FFN: 2 (3 with a GLU) [d_model, d_ff] matrices and their biases."""
    matrices = 3 if glu else 2
    return matrices * d_model * d_ff + ((matrices - 1) * d_ff + d_model if bias else 0)


class DenseFFN(MoEModule):
    """The dense two-layer feed-forward block, the baseline: y = W2 act(W1 x + b1) + b2; with
    activation="swiglu", y = W2 (silu(W1 x + b1) * (W3 x + b3)) + b2 (three matrices).

    d_ff: hidden width. dropout: on the hidden activations in training. bias: b1, b2 (and b3).
    n_layers: pre-LN init of the σ-MoE code, std sqrt(2 / (n_layers * fan_in)).
    Parameters: fc1.weight [d_ff, d_model], fc1.bias, fc2.weight [d_model, d_ff], fc2.bias;
    fc3.weight [d_ff, d_model], fc3.bias with SwiGLU.
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
            check_choice(self, "activation", DENSE_ACTIVATIONS)
            check_probabilities(self, "dropout")
            check_bools(self, "bias")

        def parameter_count(self) -> ParameterCount:
            glu = self.activation in GATED_ACTIVATIONS
            n = dense_parameters(self.d_model, self.d_ff, self.bias, glu)
            return ParameterCount(total=n, active=n)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        self.fc1 = nn.Linear(c.d_model, c.d_ff, bias=c.bias)
        self.fc2 = nn.Linear(c.d_ff, c.d_model, bias=c.bias)
        gated = c.activation in GATED_ACTIVATIONS
        self.fc3 = nn.Linear(c.d_model, c.d_ff, bias=c.bias) if gated else None
        self.dropout = nn.Dropout(c.dropout)
        scale = (2.0 / c.n_layers) ** 0.5
        for fc in (self.fc1, self.fc2, self.fc3):
            if fc is not None:
                nn.init.normal_(fc.weight, std=scale * fc.in_features**-0.5)
                if c.bias:
                    nn.init.zeros_(fc.bias)

    def forward_tokens(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Tensor:
        if self.fc3 is not None:
            u = GATED_ACTIVATIONS[self.config.activation](self.fc1(x_TD)) * self.fc3(x_TD)
        else:
            u = ACTIVATIONS[self.config.activation](self.fc1(x_TD))
        return self.fc2(self.dropout(u))
