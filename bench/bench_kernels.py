"""moe-kernels benchmark: the expert MLP (two expert matmuls) against its anchors.

For each shape (T, d, E, G, K): median forward and forward+backward time (with the spread of
the interleaved repeats), peak CUDA memory and achieved TFLOP/s of
  fast          moe_kernels.expert_mlp (CPU: the torch backend, layout chosen by padding cost;
                CUDA: the Triton kernels); on the CPU also both layouts forced, fast[grouped]
                (torch._grouped_mm / per-expert loop) and fast[padded] (one bmm per product)
  naive         moe_kernels.expert_mlp_naive (sort by expert, loop over experts)
  dense_flops   a dense MLP of width K*G: the same active FLOPs (the floor)
  dense_params  a dense MLP of width E*G: the same parameter count
  grouped_mm    (CUDA only) sort + gather + torch._grouped_mm, differentiated by autograd
and the ratios fast / dense_flops and naive / fast of the forward+backward medians.
CPU rows: fp32 on 2 threads. GPU rows: bf16, only when CUDA is available.
Fine-grained rows (issue 21; target: fast forward+backward within 2.5x of dense_flops): many
small experts, relu and swiglu (silu(x W1) * (x W3), then W2; the dense MLPs gated alike), fast
and the dense MLPs only.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moe_kernels  # noqa: E402
from timing import peak_memory_mb, time_interleaved  # noqa: E402

CPU_SHAPES = [
    (2048, 256, 16, 64, 4),
    (2048, 256, 64, 64, 4),
    (1024, 512, 8, 1024, 2),
    (1024, 256, 128, 32, 8),
]
FINE_GRAINED_SHAPES = [(2048, 256, 64, 32, 8), (2048, 512, 128, 64, 8)]
GPU_SHAPES = [
    (32768, 512, 128, 128, 4),
    (32768, 1024, 32, 128, 4),
    (24576, 1536, 128, 256, 8),
    (16384, 4096, 8, 8192, 2),
]


def _inputs(shape, dtype, device, seed=0):
    T, D, E, G, K = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(device, dtype)

    idx = torch.rand(T, E, generator=gen).topk(K, dim=1).indices.to(device)
    gates = torch.rand(T, K, generator=gen).softmax(-1).to(device, dtype)
    return dict(
        x=randn(T, D),
        w1=randn(E, D, G, scale=D**-0.5),
        w2=randn(E, G, D, scale=G**-0.5),
        w3=randn(E, D, G, scale=D**-0.5),
        idx=idx,
        gates=gates,
        dense_flops=(
            randn(D, K * G, scale=D**-0.5),
            randn(K * G, D, scale=(K * G) ** -0.5),
            randn(D, K * G, scale=D**-0.5),
        ),
        dense_params=(
            randn(D, E * G, scale=D**-0.5),
            randn(E * G, D, scale=(E * G) ** -0.5),
            randn(D, E * G, scale=D**-0.5),
        ),
    )


def _dense(activation):
    if activation == "swiglu":
        return lambda x, a, b, c: (F.silu(x @ a) * (x @ c)) @ b
    return lambda x, a, b: F.relu(x @ a) @ b


def _grouped_mm_mlp(x, w1, w2, idx, gates):
    """The plain-torch anchor on CUDA: sort, gather, two _grouped_mm calls, weight, unpermute."""
    T, K = idx.shape
    r = moe_kernels.sort_by_expert(idx, w1.shape[0])
    ends = r.offsets_E1[1:].to(torch.int32)
    xs = x[r.order_N // K]
    h = F.relu(torch._grouped_mm(xs, w1, ends))
    ys = torch._grouped_mm(h, w2, ends) * gates.reshape(-1)[r.order_N, None]
    return ys[r.inverse_N].view(T, K, -1).sum(1)


def _impls(inp, device, layouts=True, activation="relu"):
    x, w1, w2, idx, gates = (inp[k] for k in ("x", "w1", "w2", "idx", "gates"))
    gated = activation == "swiglu"
    n_dense = 3 if gated else 2

    def fast(x, w1, w2, w3=None):
        return moe_kernels.expert_mlp(x, w1, w2, idx, gates, activation, w3=w3)

    impls = {
        "fast": fast,
        "naive": lambda x, w1, w2: moe_kernels.expert_mlp_naive(x, w1, w2, idx, gates, "relu"),
        "dense_flops": _dense(activation),
        "dense_params": _dense(activation),
    }
    weights = {
        "fast": (w1, w2, inp["w3"]) if gated else (w1, w2),
        "naive": (w1, w2),
        "dense_flops": inp["dense_flops"][:n_dense],
        "dense_params": inp["dense_params"][:n_dense],
    }
    if device == "cpu" and layouts:
        for layout in ("grouped", "padded"):
            impls[f"fast[{layout}]"] = lambda x, w1, w2, b=f"torch_{layout}": (
                moe_kernels.expert_mlp(x, w1, w2, idx, gates, "relu", backend=b)
            )
            weights[f"fast[{layout}]"] = (w1, w2)
    if device == "cuda":
        impls["grouped_mm"] = lambda x, w1, w2: _grouped_mm_mlp(x, w1, w2, idx, gates)
        weights["grouped_mm"] = (w1, w2)
    return {name: (fn, weights[name]) for name, fn in impls.items()}


def _fwd(fn, x, ws):
    def run():
        with torch.no_grad():
            fn(x, *ws)

    return run


def _fwd_bwd(fn, x, ws):
    leaves = [t.detach().requires_grad_() for t in (x, *ws)]

    def run():
        y = fn(*leaves)
        y.backward(torch.ones_like(y))
        for t in leaves:
            t.grad = None

    return run


def bench_shape(
    shape, dtype, device, repeats, skip=(), quick=False, activation="relu", layouts=True
):
    T, D, E, G, K = shape
    inp = _inputs(shape, dtype, device)
    impls = _impls(inp, device, layouts and not quick, activation)
    impls = {k: v for k, v in impls.items() if k not in skip}
    fns = {}
    for name, (fn, ws) in impls.items():
        fns[(name, "fwd")] = _fwd(fn, inp["x"], ws)
        fns[(name, "fwd_bwd")] = _fwd_bwd(fn, inp["x"], ws)
    times = time_interleaved(fns, repeats, warmup=1 if quick else 2, device=device)
    n_mm = 3 if activation == "swiglu" else 2  # matmuls of 2 * T * K * D * G FLOPs each
    active = n_mm * 2 * T * K * D * G
    flops = {name: active for name in impls}
    flops["dense_params"] = n_mm * 2 * T * E * D * G
    rows = []
    floor = times[("dense_flops", "fwd_bwd")]["median_ms"]
    fast = times[("fast", "fwd_bwd")]["median_ms"]
    for name in impls:
        f, fb = times[(name, "fwd")], times[(name, "fwd_bwd")]
        rows.append(
            {
                "device": device,
                "dtype": str(dtype).removeprefix("torch."),
                "shape (T,d,E,G,K)": str(shape),
                "activation": activation,
                "impl": name,
                "fwd_ms": f["median_ms"],
                "fwd_spread_ms": f"{f['min_ms']:.3g}-{f['max_ms']:.3g}",
                "fwd_bwd_ms": fb["median_ms"],
                "fwd_bwd_spread_ms": f"{fb['min_ms']:.3g}-{fb['max_ms']:.3g}",
                "peak_mb": peak_memory_mb(fns[(name, "fwd_bwd")], device),
                "fwd_bwd_tflops": 3 * flops[name] / (fb["median_ms"] * 1e-3) / 1e12,
                "x_dense_flops": fb["median_ms"] / floor,
                "naive_over_fast" if name == "naive" else "fast_over_this": (
                    fb["median_ms"] / fast if name == "naive" else fast / fb["median_ms"]
                ),
            }
        )
    return rows


def run(quick: bool) -> list[dict]:
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for shape in CPU_SHAPES:
            if quick:
                T, D, E, G, K = shape
                shape = (T // 16, D, E, G, K)
            rows += bench_shape(shape, torch.float32, "cpu", 1 if quick else 7, quick=quick)
        for shape in FINE_GRAINED_SHAPES:
            if quick:
                T, D, E, G, K = shape
                shape = (T // 16, D, E, G, K)
            for activation in ("relu", "swiglu"):
                rows += bench_shape(
                    shape, torch.float32, "cpu", 1 if quick else 7, skip=("naive",),
                    quick=quick, activation=activation, layouts=False,
                )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    if torch.cuda.is_available():
        for shape in GPU_SHAPES:
            if quick:
                T, D, E, G, K = shape
                shape = (T // 16, D, E, G, K)
            # the naive loop over experts is slow at the widest of these sizes
            skip = ("naive",) if shape[3] * shape[2] > 16384 else ()
            rows += bench_shape(
                shape, torch.bfloat16, "cuda", 5 if quick else 20, skip=skip, quick=quick
            )
    return rows
