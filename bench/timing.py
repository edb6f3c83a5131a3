"""Shared timing helpers for the benchmark entries: interleaved repeats, medians and spread."""

import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, repeats: int, warmup: int = 2, device="cpu") -> dict:
    """Time each callable `repeats` times, round-robin so that machine noise hits all alike.

    Returns {name: {"median_ms", "min_ms", "max_ms"}}.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {
        name: {"median_ms": statistics.median(s), "min_ms": min(s), "max_ms": max(s)}
        for name, s in samples.items()
    }


def peak_memory_mb(fn, device="cpu") -> float | None:
    """Peak CUDA memory of one call; None on the CPU (no allocator statistics there)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20
