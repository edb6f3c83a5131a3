"""The dense feed-forward baseline with the moe_layers interface."""

from torch import Tensor, nn

from moe_layers.base import ACTIVATIONS, MoEModule, check_choice, check_positive


class DenseFFN(MoEModule):
    """The dense two-layer feed-forward block, the baseline: y = W2 act(W1 x + b1) + b2."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        bias: bool = True,
        n_layers: int = 1,
    ) -> None:
        super().__init__()
        check_positive(d_model=d_model, d_ff=d_ff, n_layers=n_layers)
        check_choice("activation", activation, ACTIVATIONS)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.activation = activation
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        # pre-LN init of the σ-MoE code: std sqrt(2 / (n_layers * fan_in))
        scale = (2.0 / n_layers) ** 0.5
        nn.init.normal_(self.fc1.weight, std=scale * d_model**-0.5)
        nn.init.normal_(self.fc2.weight, std=scale * d_ff**-0.5)
        if bias:
            nn.init.zeros_(self.fc1.bias)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        self._start_forward()
        return self.fc2(self.dropout(ACTIVATIONS[self.activation](self.fc1(x))))
