"""Learning-rate schedule: linear warmup, then cosine, linear or constant decay to min_lr_ratio."""

from __future__ import annotations

import math

import torch


def lr_factor(
    step: int, *, max_steps: int, warmup_steps: int, schedule: str, min_ratio: float
) -> float:
    """Multiplier of the peak learning rate for optimiser step `step` (0-based).

    Warmup rises linearly to 1 over `warmup_steps` steps (the first step already gets 1/warmup so
    that no step is wasted at lr 0); decay then goes from 1 at the end of warmup to `min_ratio` at
    `max_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(max_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected cosine, linear or constant")
    return min_ratio + (1.0 - min_ratio) * decay


def make_scheduler(
    optimizer: torch.optim.Optimizer, train_cfg
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(
            step,
            max_steps=train_cfg.max_steps,
            warmup_steps=train_cfg.warmup_steps,
            schedule=train_cfg.schedule,
            min_ratio=train_cfg.min_lr_ratio,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
