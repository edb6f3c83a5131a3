"""How fast a model generates: prefill and decode tokens/s against the memory-bandwidth bound.

A decode step reads at least every weight a token uses once. Its bound (the "floor") is measured,
not assumed: the time of one batch-1 product with matrices of the model's dtype holding as many
values as the model's active parameters (`moe_models.count_parameters`), all of them read once;
the measured bandwidth is those bytes over that time. decode step / floor says how far a step is
from streaming its weights (1.0: nothing but the weights' read).

Models are measured round-robin (`measure`), so that a loaded machine slows all of them alike,
and medians are kept. On the CPU with one torch thread the clock is the thread's CPU time (what
the process did, not what other processes took from it); otherwise wall time, synchronised on
CUDA. Prompts are random token ids; decoding is greedy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import moe_models
import torch
from moe_models.generate import feed, stream
from torch import nn

# the floor's matrices hold at most this many values each: few and large, so that the floor is
# the read of the weights and not the overhead of many small products
FLOOR_CHUNK = 2**24


@dataclass(frozen=True)
class GenerationSpeed:
    """Medians of one model's timings (seconds). prefill_s: reading a batch x prompt_len
    prompt; decode_step_s: one new token for the whole batch; floor_s: reading the active
    weights once; weight_bytes: those weights' bytes."""

    batch: int
    prompt_len: int
    new_tokens: int
    prefill_s: float
    decode_step_s: float
    floor_s: float
    weight_bytes: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_len / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch / self.decode_step_s

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.weight_bytes / self.floor_s

    @property
    def step_over_floor(self) -> float:
        return self.decode_step_s / self.floor_s

    def row(self) -> dict:
        return {
            "batch": self.batch,
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 1),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 1),
            "decode_step_ms": round(self.decode_step_s * 1e3, 3),
            "floor_ms": round(self.floor_s * 1e3, 3),
            "step_over_floor": round(self.step_over_floor, 2),
            "weight_mb_per_token": round(self.weight_bytes / 2**20, 1),
            "bandwidth_gb_per_s": round(self.bandwidth_bytes_per_s / 1e9, 2),
        }


def clock(device: torch.device) -> Callable[[], float]:
    """Thread CPU time on the CPU with one torch thread; wall time (synchronised) otherwise."""
    if device.type == "cuda":

        def cuda_time() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return cuda_time
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _weights(model: nn.Module) -> tuple[int, torch.dtype, torch.device]:
    param = next(model.parameters())
    active = moe_models.count_parameters(model.config)["active"]
    return active, param.dtype, param.device


def floor_matrices(n_values: int, d_model: int, dtype, device) -> list[torch.Tensor]:
    """Matrices of d_model rows holding n_values in all (rounded up to whole columns), at most
    FLOOR_CHUNK values each."""
    width = max(1, FLOOR_CHUNK // d_model)
    mats, left = [], n_values
    g = torch.Generator().manual_seed(0)
    while left > 0:
        cols = min(width, -(-left // d_model))
        mats.append(torch.randn(d_model, cols, generator=g).to(device, dtype))
        left -= d_model * cols
    return mats


class _Timed:
    """One model's prefill, decode and floor callables, each returning its own seconds."""

    def __init__(self, model: nn.Module, batch: int, prompt_len: int, new_tokens: int, seed: int):
        self.model = model.eval()
        active, dtype, device = _weights(model)
        self.weight_bytes = active * dtype.itemsize
        self.clock = clock(device)
        g = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        self.prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
        self.new_tokens = new_tokens
        self.mats = floor_matrices(active, model.config.d_model, dtype, device)
        self.x = torch.randn(1, model.config.d_model, generator=g).to(device, dtype)

    @torch.no_grad()
    def prefill(self) -> float:
        t0 = self.clock()
        feed(self.model, self.prompt)
        return self.clock() - t0

    def decode_step(self) -> float:
        tokens = stream(self.model, self.prompt, self.new_tokens + 1, greedy=True)
        next(tokens)  # the prompt's read and the first token: prefill's part
        t0 = self.clock()
        for _ in tokens:
            pass
        return (self.clock() - t0) / self.new_tokens

    @torch.no_grad()
    def floor(self) -> float:
        t0 = self.clock()
        for w in self.mats:
            self.x @ w
        return self.clock() - t0


def measure(
    models: dict[str, nn.Module],
    *,
    batch: int = 1,
    prompt_len: int = 32,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, GenerationSpeed]:
    """Each model's prefill, decode step and floor, timed round-robin over the models `repeats`
    times after `warmup` rounds; medians. Every model gets the same random prompt."""
    if new_tokens < 1 or prompt_len < 1 or batch < 1 or repeats < 1:
        raise ValueError("batch, prompt_len, new_tokens and repeats must be >= 1")
    timed = {name: _Timed(m, batch, prompt_len, new_tokens, seed) for name, m in models.items()}
    samples = {name: {"prefill": [], "decode_step": [], "floor": []} for name in timed}
    for round_ in range(warmup + repeats):
        for name, t in timed.items():
            for kind, fn in (("prefill", t.prefill), ("decode_step", t.decode_step)):
                seconds = fn()
                if round_ >= warmup:
                    samples[name][kind].append(seconds)
            # the floor is short: several reads per round steady its median
            floors = [t.floor() for _ in range(3)]
            if round_ >= warmup:
                samples[name]["floor"].extend(floors)
    return {
        name: GenerationSpeed(
            batch=batch,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            prefill_s=statistics.median(s["prefill"]),
            decode_step_s=statistics.median(s["decode_step"]),
            floor_s=statistics.median(s["floor"]),
            weight_bytes=timed[name].weight_bytes,
        )
        for name, s in samples.items()
    }
