"""The expert activations and their derivatives, for the hand-written backward passes."""

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "silu")


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
