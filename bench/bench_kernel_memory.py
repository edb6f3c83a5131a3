"""Peak memory of one expert MLP forward+backward on the CPU against the dense MLPs (issue 22).

The measurements run in a fresh Python process with glibc's mmap threshold at 64 KiB
(MALLOC_MMAP_THRESHOLD_=65536, so that freed blocks go back to the system and the resident set
follows the live tensors), one after the other: inputs built, one warm-up call, the peak
resident set reset (/proc/self/clear_refs), one more call; a row gives the peak above the
resident set before it
(`peak_mib`: the activations kept for the backward, the transients and the weight gradients).
Impls as in bench_kernels: `fast` (moe_kernels.expert_mlp, the torch backend), `naive`,
`dense_flops` (width K*G: the same FLOPs) and `dense_params` (width E*G: the same parameters,
so gradients of the same size). `x_dense_flops` / `x_dense_params`: the fast row over each.
fp32, 1 thread. Shapes: the σ-MoE layer of sigma-moe-wt103-small at batch 2 x 256, and the
fine-grained shapes of bench_kernels.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

SHAPES = [
    (512, 412, 16, 128, 4),
    (2048, 256, 64, 32, 8),
    (2048, 512, 128, 64, 8),
]
IMPLS = ("fast", "naive", "dense_flops", "dense_params")


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(shape, impl: str, activation: str) -> float:
    import moe_kernels
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    T, D, E, G, K = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=gen).requires_grad_()
    idx = torch.rand(T, E, generator=gen).topk(K, dim=1).indices
    gates = torch.rand(T, K, generator=gen).softmax(-1).requires_grad_()
    gated = activation == "swiglu"
    width = {"dense_flops": K * G, "dense_params": E * G}.get(impl)
    if width is None:
        ws = [torch.randn(E, D, G), torch.randn(E, G, D)] + (
            [torch.randn(E, D, G)] if gated else []
        )
    else:
        ws = [torch.randn(D, width), torch.randn(width, D)] + (
            [torch.randn(D, width)] if gated else []
        )
    ws = [w.mul_(0.05).requires_grad_() for w in ws]

    def step():
        if impl in ("fast", "naive"):
            w3 = ws[2] if gated else None
            if impl == "fast":
                y = moe_kernels.expert_mlp(x, ws[0], ws[1], idx, gates, activation, w3=w3)
            else:
                y = moe_kernels.expert_mlp_naive(x, ws[0], ws[1], idx, gates, activation, w3)
        else:
            h = F.silu(x @ ws[0]) * (x @ ws[2]) if gated else F.relu(x @ ws[0])
            y = h @ ws[1]
        y.backward(torch.ones_like(y))
        for t in (x, gates, *ws):
            t.grad = None

    step()
    before = _rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step()
    return _rss_mib("VmHWM") - before


def _cases(quick: bool) -> list[tuple]:
    shapes = SHAPES[:1] if quick else SHAPES
    return [(s, a) for s in shapes for a in (("relu",) if quick else ("relu", "swiglu"))]


def run(quick: bool) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, __file__, json.dumps(quick)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    measured = iter(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for shape, activation in _cases(quick):
        peaks = {impl: next(measured) for impl in IMPLS}
        for impl, peak in peaks.items():
            rows.append(
                {
                    "shape (T,d,E,G,K)": str(tuple(shape)),
                    "activation": activation,
                    "impl": impl,
                    "peak_mib": round(peak, 1),
                    "x_dense_flops": peak / peaks["dense_flops"],
                    "x_dense_params": peak / peaks["dense_params"],
                }
            )
    return rows


if __name__ == "__main__":
    cases = _cases(json.loads(sys.argv[1]))
    print(json.dumps([child(s, impl, a) for s, a in cases for impl in IMPLS]))
