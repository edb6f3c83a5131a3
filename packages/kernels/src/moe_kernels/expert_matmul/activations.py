"""The expert activations and their derivatives, for the hand-written backward passes.

Plain activations act on one hidden row h = x W1. Gated ones (GLU) act on two, h = x W1 and
u = x W3: swiglu(h, u) = silu(h) * u (Shazeer 2020).
"""

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "silu")
GATED_ACTIVATIONS = ("swiglu",)


def activate(name: str, h: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return F.relu(h)
    if name == "gelu":
        return F.gelu(h)
    return F.silu(h)


def activate_backward(name: str, h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad * act'(h), with gelu the exact (erf) form that F.gelu computes by default."""
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, h, 0)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
        return grad * (cdf + h * pdf)
    s = torch.sigmoid(h)
    return grad * (s * (1.0 + h * (1.0 - s)))


def activate_gated(name: str, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The gated activation of the rows h = x W1 and u = x W3 (name 'swiglu')."""
    return F.silu(h) * u


def activate_gated_backward(
    name: str, h: torch.Tensor, u: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, du) of silu(h) * u for the output gradient grad."""
    s = torch.sigmoid(h)
    return grad * u * (s * (1.0 + h * (1.0 - s))), grad * (h * s)
