"""moe-layers: forward+backward time (and CUDA peak memory) of each layer vs the parameter-equal dense FFN.

All layers of one device are timed round-robin in the same run (`time_interleaved`), in training
mode, with the input requiring a gradient (as inside a Transformer) and the auxiliary losses added
to the loss. Target (issue 5): on CPU with 2 threads, σ-MoE with E=16, G=128, K=4 at d_model=512,
T=2048 runs forward+backward at least 2x faster than the dense FFN with d_ff=2048.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_layers import (  # noqa: E402
    PKM,
    DenseFFN,
    SBaseMoE,
    SigmaMoE,
    SwitchMoE,
    TopKFFN,
    collect_aux_losses,
)
from timing import peak_memory_mb, time_interleaved  # noqa: E402

D_MODEL, N_EXPERTS, EXPERT_SIZE, K = 512, 16, 128, 4
D_FF = N_EXPERTS * EXPERT_SIZE
TARGET_SPEEDUP = 2.0


def layers(impls: tuple[str, ...]) -> dict[str, tuple[str, torch.nn.Module]]:
    """name -> (configuration, layer); every layer has about the dense FFN's parameter count."""
    out = {"dense": (f"d_ff={D_FF}", DenseFFN(D_MODEL, D_FF))}
    moe = f"E={N_EXPERTS} G={EXPERT_SIZE}"
    for impl in impls:
        out[f"sigma_moe[{impl}]"] = (
            f"{moe} K={K}",
            SigmaMoE(D_MODEL, N_EXPERTS, EXPERT_SIZE, K, entropy_weight=1e-3, impl=impl),
        )
    out["switch"] = (f"{moe} K=1", SwitchMoE(D_MODEL, N_EXPERTS, EXPERT_SIZE))
    out["sbase"] = (f"{moe} K={K}", SBaseMoE(D_MODEL, N_EXPERTS, EXPERT_SIZE, K))
    out["topk"] = (f"d_ff={D_FF} K=128", TopKFFN(D_MODEL, D_FF, 128))
    out["pkm"] = ("n_keys=64 heads=4 knn=32", PKM(D_MODEL, 64, 4, 32, activation="relu"))
    return out


def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        y = layer(x)
        loss = (y * grad).sum() + sum(collect_aux_losses(layer).values())
        loss.backward()

    return step


def measure(device: str, n_tokens: int, repeats: int, impls: tuple[str, ...]) -> list[dict]:
    torch.manual_seed(0)
    named = {n: (cfg, m.to(device).train()) for n, (cfg, m) in layers(impls).items()}
    x = torch.randn(n_tokens, D_MODEL, device=device, requires_grad=True)
    grad = torch.randn(n_tokens, D_MODEL, device=device)
    fns = {n: fwd_bwd(m, x, grad) for n, (_, m) in named.items()}
    times = time_interleaved(fns, repeats=repeats, warmup=1, device=device)
    peaks = {n: peak_memory_mb(fn, device=device) for n, fn in fns.items()}
    dense_ms = times["dense"]["median_ms"]
    dense_params = sum(p.numel() for p in named["dense"][1].parameters())
    rows = []
    for n, (cfg, m) in named.items():
        t = times[n]
        row = {
            "device": device,
            "layer": n,
            "config": cfg,
            "T": n_tokens,
            "params_vs_dense": sum(p.numel() for p in m.parameters()) / dense_params,
            "median_ms": t["median_ms"],
            "min_ms": t["min_ms"],
            "max_ms": t["max_ms"],
            "speedup_vs_dense": dense_ms / t["median_ms"],
            "peak_mb": peaks[n],
            "dense_peak_mb": peaks["dense"],
        }
        if n == "sigma_moe[fast]" and device == "cpu" and n_tokens == 2048:
            row["target"] = f">= {TARGET_SPEEDUP}x"
            row["target_met"] = row["speedup_vs_dense"] >= TARGET_SPEEDUP
        rows.append(row)
    return rows


def run(quick: bool) -> list[dict]:
    torch.set_num_threads(2)
    rows = []
    if quick:
        rows += measure("cpu", 2048, repeats=3, impls=("fast",))
    else:
        rows += measure("cpu", 2048, repeats=11, impls=("fast", "reference"))
        rows += measure("cpu", 512, repeats=11, impls=("fast", "reference"))
    if torch.cuda.is_available():
        rows += measure("cuda", 2048, repeats=5 if quick else 25, impls=("fast", "reference"))
    return rows
