"""Autoregressive generation: greedy, or sampling with a temperature, top-k and top-p.

One loop for every architecture: the prompt is read by `feed` (in segments of seq_len, so that
Transformer-XL sees the memory as in training and the sMLP its window), then each new token is fed
with the state of the previous call (the XL memory, the decoder's key/value cache, the sMLP's
window). The Hugging Face wrapper (moe_models.hf) and the lm-evaluation-harness adapter read text
through `feed` too, so they see what `generate` sees.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from moe_layers import without_routing_stats
from torch import Tensor, nn

from moe_models.common import ModelOutput


def _pick(
    logits_BV: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    greedy: bool,
    generator: torch.Generator | None,
) -> Tensor:
    if greedy:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        # a token stays when the mass of the tokens before it is below top_p (the first always)
        probs_sorted_BV = sorted_BV.softmax(-1)
        drop_sorted_BV = probs_sorted_BV.cumsum(-1) - probs_sorted_BV >= top_p
        drop_BV = torch.empty_like(drop_sorted_BV).scatter_(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def check_options(max_new_tokens, temperature, top_k, top_p, greedy) -> None:
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not greedy and not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def feed(model: nn.Module, tokens: Tensor, state=None) -> ModelOutput:
    """Read tokens [B, L] (L >= 1) after `state` (None: `model.init_state()`) in segments of
    seq_len, each given the state the one before returned. Returns the logits [B, L, V] of all
    segments and the state after the last one; the other fields are the last segment's."""
    state = model.init_state() if state is None else state
    outs = []
    for segment in tokens.split(model.config.seq_len, dim=1):
        outs.append(model(segment, state=state))
        state = outs[-1].state
    last = outs[-1]
    if len(outs) > 1:
        last.logits = torch.cat([o.logits for o in outs], dim=1)
    return last


@torch.no_grad()
def stream(
    model: nn.Module,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yields each new token [B] as it is chosen; runs in eval mode, restoring the mode."""
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, L] with L >= 1, got {tuple(prompt.shape)}")
    check_options(max_new_tokens, temperature, top_k, top_p, greedy)
    was_training = model.training
    model.eval()
    try:
        # the routing statistics are for training and evaluation; set per call, so that the
        # caller's code between two tokens records as usual
        with without_routing_stats():
            out = feed(model, prompt)
        state = out.state
        for step in range(max_new_tokens):
            nxt_B = _pick(out.logits[:, -1], temperature, top_k, top_p, greedy, generator)
            yield nxt_B
            if step + 1 < max_new_tokens:
                with without_routing_stats():
                    out = model(nxt_B[:, None], state=state)
                state = out.state
    finally:
        model.train(was_training)


def generate(model: nn.Module, prompt: Tensor, max_new_tokens: int, **options) -> Tensor:
    """prompt [B, L] (L >= 1) -> [B, L + max_new_tokens]; options as `stream`."""
    new = list(stream(model, prompt, max_new_tokens, **options))
    return torch.cat([prompt, *(t[:, None] for t in new)], dim=1)
