"""Autoregressive generation: greedy, or sampling with a temperature and top-k.

Transformer-XL reads the prompt segment by segment (seq_len tokens each) into its memory and then
feeds one token at a time, so each new token sees the memory (`mem_len` earlier positions) as in
training. The decoder keeps a key/value cache. The sMLP model's spatial gating has a fixed window,
so it recomputes the last seq_len tokens at every step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _pick(
    logits_BV: Tensor,
    temperature: float,
    top_k: int | None,
    greedy: bool,
    generator: torch.Generator | None,
) -> Tensor:
    if greedy:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """prompt [B, L] (L >= 1) -> [B, L + max_new_tokens]; runs in eval mode, restoring the mode."""
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, L] with L >= 1, got {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    was_training = model.training
    model.eval()
    try:
        step = {"transformer_xl": _xl_steps, "decoder": _decoder_steps, "smlp": _window_steps}
        return step[model.arch](
            model,
            prompt,
            max_new_tokens,
            lambda lg: _pick(lg, temperature, top_k, greedy, generator),
        )
    finally:
        model.train(was_training)


def _xl_steps(model, prompt, n, pick):
    mems, out = None, None
    for segment in prompt.split(model.config.seq_len, dim=1):
        out = model(segment, mems=mems)
        mems = out.mems
    tokens = [prompt]
    for step in range(n):
        nxt_B1 = pick(out.logits[:, -1])[:, None]
        tokens.append(nxt_B1)
        if step + 1 < n:
            out = model(nxt_B1, mems=mems)
            mems = out.mems
    return torch.cat(tokens, dim=1)


def _decoder_steps(model, prompt, n, pick):
    out = model(prompt, use_cache=True)
    tokens = [prompt]
    for step in range(n):
        nxt_B1 = pick(out.logits[:, -1])[:, None]
        tokens.append(nxt_B1)
        if step + 1 < n:
            out = model(nxt_B1, past_kv=out.past_kv, use_cache=True)
    return torch.cat(tokens, dim=1)


def _window_steps(model, prompt, n, pick):
    seq = prompt
    for _ in range(n):
        logits_BV = model(seq[:, -model.config.seq_len :]).logits[:, -1]
        seq = torch.cat([seq, pick(logits_BV)[:, None]], dim=1)
    return seq
