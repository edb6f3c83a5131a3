"""moe-layers SwitchHead: forward+backward time (and CUDA peak memory) of its two expert
projection paths, impl="fast" (moe_kernels.expert_matmul on the k chosen experts) and "dense"
(every expert in one matmul, then the chosen ones), against multi-head attention of the same
parameter count (torch's scaled_dot_product_attention with dense q, k, v, o projections).

Timed round-robin in one run (`time_interleaved`), training mode, the input requiring a gradient.
No target: the table says which path is faster where (the "fast" path does k/E of the FLOPs of
the "dense" one but pays the kernels' routing).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_layers import SwitchHead  # noqa: E402
from timing import peak_memory_mb, time_interleaved  # noqa: E402


class DenseAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_head: int) -> None:
        super().__init__()
        self.h, self.d = n_heads, d_head
        self.qkv = nn.Linear(d_model, 3 * n_heads * d_head, bias=False)
        self.out = nn.Linear(n_heads * d_head, d_model, bias=False)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(B, L, -1))


def run(quick: bool) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the 47M SwitchHead preset's attention: d 412, 2 heads of 76, 5 experts, k = 2; dense: 10 x 41
    d_model, batch, length = 412, (2 if quick else 8), (128 if quick else 256)
    layers = {
        "switchhead[fast]": SwitchHead(d_model, 2, 5, 2, d_head=76, impl="fast"),
        "switchhead[dense]": SwitchHead(d_model, 2, 5, 2, d_head=76, impl="dense"),
        "dense attention 10x41": DenseAttention(d_model, 10, 41),
    }
    x = torch.randn(batch, length, d_model, device=device, requires_grad=True)
    grad = torch.randn_like(x)

    def step(layer):
        def fn():
            layer(x).backward(grad)

        return fn

    for layer in layers.values():
        layer.to(device).train()
    fns = {name: step(layer) for name, layer in layers.items()}
    times = time_interleaved(fns, repeats=3 if quick else 10, device=device)
    return [
        {
            "layer": name,
            "params": sum(p.numel() for p in layers[name].parameters()),
            "tokens": batch * length,
            "device": device,
            "fwd+bwd median ms": times[name]["median_ms"],
            "peak MiB": peak_memory_mb(fns[name], device),
        }
        for name in layers
    ]
