"""Memory preflight: before the model is built, refuse a run that cannot fit its device.

The estimate, in bytes, for one rank holding P parameters:

    states      = 16 P    fp32 weights (also the master copy under bf16/fp16 autocast) 4 P,
                          their gradients 4 P, AdamW's two moments 8 P
    activations = N * (n_layers * (34 d + 5 h c) * b / 2 + 12 V)

with N = micro-batch * seq_len tokens per forward pass, d = d_model, h = attention heads (0 for
the sMLP), c = the attention context (seq_len, plus the memory for Transformer-XL), b = bytes
per activation (2 under bf16/fp16 autocast, 4 in fp32) and V = vocab_size (the fp32 logits,
their softmax and its gradient). The per-layer term is the activation memory of a Transformer
layer after Korthikanti et al. 2022 ("Reducing activation recomputation in large transformer
models", 16-bit activations); for MoE layers it is rough. P comes from
`moe_models.count_parameters` (exact, computed without allocating the model); with experts
sharded over R ranks a rank holds the parameters a token uses plus 1/R of the others.

What is available: the free memory of the GPU (`torch.cuda.mem_get_info`) on CUDA, where the
host must also hold the fp32 weights (the model is built there first); on the CPU, MemAvailable
from /proc/meminfo (elsewhere free physical pages from os.sysconf). `train.skip_memory_check=true`
turns the check off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import moe_models
import torch

from moe_train.errors import CLIError

GIB = 2**30


@dataclass(frozen=True)
class Estimate:
    parameters: int
    states: int
    activations: int

    @property
    def total(self) -> int:
        return self.states + self.activations


def estimate(model_cfg, train_cfg, micro_batch: int, expert_shards: int = 1) -> Estimate:
    counts = moe_models.count_parameters(model_cfg)
    inactive = counts["total"] - counts["active"]
    params = counts["active"] + -(-inactive // expert_shards)
    heads = 0 if model_cfg.arch == "smlp" else model_cfg.n_heads
    context = model_cfg.seq_len
    if model_cfg.arch == "transformer_xl":
        context += model_cfg.memory_length
    b = 4 if train_cfg.precision == "fp32" else 2
    per_token = (
        model_cfg.n_layers * (34 * model_cfg.d_model + 5 * heads * context) * b // 2
        + 12 * model_cfg.vocab_size
    )
    return Estimate(
        parameters=params,
        states=16 * params,
        activations=micro_batch * model_cfg.seq_len * per_token,
    )


def host_available() -> int | None:
    """Bytes of RAM a new allocation can get without swapping (None: unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_available(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available()


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _count(n: int) -> str:
    """A parameter count readable at every size (a tiny model is not "0.00B")."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def preflight(model_cfg, train_cfg, micro_batch: int, device: torch.device, expert_shards=1):
    """Raise a one-line CLIError when the estimate exceeds what `device` (and, for CUDA, the
    host) has available."""
    if train_cfg.skip_memory_check:
        return
    est = estimate(model_cfg, train_cfg, micro_batch, expert_shards)
    hint = "use a smaller model or batch, or train.skip_memory_check=true to try anyway"
    needs = (
        f"about {_gib(est.total)} ({_count(est.parameters)} parameters: weights, gradients "
        f"and AdamW moments {_gib(est.states)}; activations {_gib(est.activations)})"
    )
    free = device_available(device)
    if free is not None and est.total > free:
        raise CLIError(f"the run needs {needs} on {device} but {_gib(free)} is available; {hint}")
    if device.type == "cuda":
        host = host_available()
        weights = 4 * est.parameters
        if host is not None and weights > host:
            raise CLIError(
                f"the model's fp32 weights need {_gib(weights)} of host memory to be built, "
                f"{_gib(host)} is available; {hint}"
            )
