"""What every language model here shares: the one call, the output record, input checks, loss.

Every architecture is called as `model(tokens, targets=None, *, state=None)` and returns a
`ModelOutput`. `state` is what carries context from one call to the next: the Transformer-XL
memory, the decoder's key/value cache, the sMLP's window of earlier tokens. A model returns the
state for its next call when there is one to carry: Transformer-XL always (its memory is part of
training), the others only when they were given a state, which `model.init_state()` starts
(generation does this). So a trainer and an evaluation feed `out.state` back without knowing the
architecture, and `carries_state` tells them whether to read the data as contiguous streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from moe_layers import RoutingStats, collect_layer_outputs
from moe_layers.base import check_id_range
from torch import Tensor, nn
from torch.nn import functional as F

from moe_models.config import ModelConfig
from moe_models.primitives import sinusoid_table

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "LanguageModel", "ModelOutput", "lm_loss", "sinusoid_table"]


@dataclass
class ModelOutput:
    """logits [B, L, V]; loss = lm_loss + sum of the weighted auxiliary losses (None without
    targets); lm_loss: mean cross-entropy in nats per non-ignored target; aux_losses: the
    weighted auxiliary losses by name, summed over layers; routing_stats by layer name; state:
    the context for the next call (see the module docstring), or None."""

    logits: Tensor
    loss: Tensor | None = None
    lm_loss: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    routing_stats: dict[str, RoutingStats] = field(default_factory=dict)
    state: Any = None


class LanguageModel(nn.Module):
    """Base of the three models: the input checks, the output head's loss and the output record.

    carries_state: True when the state one training segment returns belongs to the next segment
    of the same stream (the Transformer-XL memory), so that training reads contiguous streams.
    """

    arch: str
    carries_state: bool = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def init_state(self):
        """The state that starts a stream of calls (None: the model starts its own)."""
        return None

    def check_tokens(self, tokens: Tensor, targets: Tensor | None) -> None:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"tokens must be an integer tensor [B, L], got {tokens.dtype} {tuple(tokens.shape)}"
            )
        # a ValueError on the CPU; on CUDA and under torch.compile an assert the host does not
        # wait for (the range check read two values back from the device on every forward)
        check_id_range(tokens, self.config.vocab_size, "tokens", "vocab_size")
        if targets is not None and targets.shape != tokens.shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} != tokens shape {tuple(tokens.shape)}"
            )

    def check_memory(self, tokens: Tensor, mems, n: int, per: str) -> None:
        """A Transformer-XL-style memory: `n` tensors [B, M, d_model], one per `per`."""
        if not isinstance(mems, list | tuple) or len(mems) != n:
            raise ValueError(
                f"state must be the memory of the previous segment, one tensor per {per} ({n}), "
                f"got {type(mems).__name__} of length "
                f"{len(mems) if isinstance(mems, list | tuple) else '-'}"
            )
        if any(m.shape[0] != tokens.shape[0] or m.shape[-1] != self.config.d_model for m in mems):
            raise ValueError(
                f"state must be [B={tokens.shape[0]}, M, d_model={self.config.d_model}] tensors "
                f"(the .state of the previous segment of the same batch), got "
                f"{tuple(mems[0].shape)}"
            )

    def finish(
        self, logits_BLV: Tensor, targets: Tensor | None, state=None, aux_losses=None
    ) -> ModelOutput:
        """The output record; aux_losses: model-level auxiliary losses added to the layers'."""
        aux, routing_stats = collect_layer_outputs(self)
        if aux_losses:
            aux = {**aux, **aux_losses}
        out = ModelOutput(
            logits=logits_BLV,
            aux_losses=aux,
            routing_stats=routing_stats,
            state=state,
        )
        if targets is not None:
            out.lm_loss = lm_loss(logits_BLV, targets)
            out.loss = out.lm_loss + sum(aux.values()) if aux else out.lm_loss
        return out


def lm_loss(logits_BLV: Tensor, targets_BL: Tensor) -> Tensor:
    """Mean cross-entropy (nats) over targets that are not IGNORE_INDEX; 0 when all are ignored."""
    flat = logits_BLV.reshape(-1, logits_BLV.shape[-1]).float()
    total = F.cross_entropy(
        flat, targets_BL.reshape(-1).long(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (targets_BL != IGNORE_INDEX).sum().clamp(min=1)
    return total / count
