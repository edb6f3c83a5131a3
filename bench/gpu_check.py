"""The prepared GPU check (issue 13): one command, one JSON file and a printed table.

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python3 bench/gpu_check.py --out gpu_check.json

Runs on the preinstalled torch/triton (cupy, einops, hypothesis when present) without `uv sync`,
in about 8 minutes at most on one H100/H200. Sections, each check one pass/fail/skip row with its
error message, none aborting the script:
  kernels  Triton vs the fp64 and same-dtype references (fp32/bf16/fp16): expert_mlp,
           expert_matmul gated and per-slot, on T = 0, one token, empty experts, odd sizes,
           non-contiguous inputs (the tests' tolerance rule)
  cupy     the CuPy routing sort vs the torch sort (when cupy imports)
  layers   every moe_layers layer forward+backward on CUDA under bf16 autocast
  models   one training step of tiny-sigma-moe and tiny-gshard under
           torch.cuda.set_sync_debug_mode("error"), after a warm-up step
  compile  torch.compile vs eager for one σ-MoE layer, output and gradients
  generate sigma-moe-wt103-small vs dense-wt103-small: a training step's peak allocated memory
           (torch.cuda.max_memory_allocated above the model); decode steps at batch 1 and 8,
           eager (XLCache) and torch.compile(mode="reduce-overhead") on the memory state, whose
           shapes are static once the memory is full
  bench    expert_mlp fwd+bwd in bf16 beside the dense same-FLOPs MLP, torch._grouped_mm and
           ScatterMoE (when importable), CUDA events, medians; the targets as pass/fail rows
Each section has a time budget (BUDGETS, seconds); a check that would start past it is skipped.
Without CUDA it prints one line and exits 0; --cpu-smoke runs every section's code on the CPU
with tiny shapes (the torch backend for the kernels, skipping what needs CUDA), for the test that
proves this script's logic.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

BUDGETS = {
    "kernels": 90,
    "cupy": 15,
    "layers": 45,
    "models": 60,
    "compile": 75,
    "generate": 120,
    "bench": 150,
    "fsdp2": 60,
}
GPU_SHAPES = [
    (32768, 512, 128, 128, 4),
    (32768, 1024, 32, 128, 4),
    (24576, 1536, 128, 256, 8),
    (16384, 4096, 8, 8192, 2),
]
SMOKE_SHAPES = [(64, 16, 8, 8, 2), (48, 32, 4, 16, 1)]
# (T, d_in, d_out, E, K, experts used, non-contiguous): T = 0, one token, empty experts, odd sizes
KERNEL_CASES = [
    (0, 16, 24, 4, 2, 4, False),
    (1, 8, 8, 3, 1, 3, False),
    (37, 19, 23, 5, 2, 2, False),
    (300, 64, 160, 16, 4, 9, True),
    (513, 128, 96, 8, 8, 8, False),
    (1000, 72, 40, 12, 3, 12, True),
]
SMOKE_KERNEL_CASES = [*KERNEL_CASES[:3], (40, 12, 20, 6, 2, 3, True)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACTIVATIONS = ("relu", "gelu", "silu")


class Report:
    """Rows of (section, check, status, seconds, detail); a check past its budget is skipped."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.section = ""
        self.deadline = 0.0

    def start(self, section: str) -> None:
        self.section = section
        self.deadline = time.perf_counter() + BUDGETS[section]

    def add(self, check: str, status: str, seconds: float = 0.0, detail: str = "", **extra):
        row = {"section": self.section, "check": check, "status": status}
        row.update(seconds=round(seconds, 2), detail=detail[:300], **extra)
        self.rows.append(row)
        return row

    def run(self, check: str, fn, *args) -> object:
        """fn(*args) -> detail string (or a dict of extra columns); failures become rows."""
        if time.perf_counter() > self.deadline:
            self.add(check, "skip", detail=f"section budget of {BUDGETS[self.section]} s spent")
            return None
        started = time.perf_counter()
        try:
            out = fn(*args)
        except Exception as e:
            where = traceback.extract_tb(e.__traceback__)[-1]
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            self.add(check, "fail", time.perf_counter() - started, f"{msg} ({where.name})")
            return None
        extra = out if isinstance(out, dict) else {"detail": out or ""}
        self.add(check, "pass", time.perf_counter() - started, **extra)
        return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- kernels ----


def _case_inputs(case, dtype, device, kind, seed):
    T, d_in, d_out, E, K, used, noncontig = case
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        if noncontig and len(shape) >= 2:
            t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=torch.float64)
            return (t * scale).to(device, dtype).transpose(-1, -2)
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)

    idx = torch.rand(T, used, generator=gen).argsort(dim=1)[:, :K].to(device)
    kept = torch.rand(T, K, generator=gen) > 0.2  # dropped slots, as capacity limits make
    gates = torch.rand(T, K, generator=gen, dtype=torch.float64) * kept
    gates = gates.to(device, dtype)
    if kind == "mlp":
        return dict(
            x=randn(T, d_in), w1=randn(E, d_in, d_out, scale=d_in**-0.5),
            w2=randn(E, d_out, d_in, scale=d_out**-0.5), idx=idx, gates=gates,
        )  # fmt: skip
    x = randn(T, K, d_in) if kind == "matmul_per_slot" else randn(T, d_in)
    w = randn(E, d_in, d_out, scale=d_in**-0.5)
    return dict(x=x, w=w, idx=idx, gates=None if kind == "matmul_per_slot" else gates)


def _outputs_and_grads(fn, inputs, seed, dtype=None):
    leaves = {
        k: (v if dtype is None else v.to(dtype)).detach().requires_grad_()
        for k, v in inputs.items()
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point
    }
    out = fn(**{**inputs, **leaves})
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    grads = [None] * len(leaves)
    if out.requires_grad:
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out, allow_unused=True)
    grads = [
        torch.zeros_like(v) if g is None else g for v, g in zip(leaves.values(), grads, strict=True)
    ]
    return [out.detach(), *grads], ["out", *leaves]


def _check_against_reference(case, dtype, kind, activation, backend, device, seed):
    """The tests' rule: the fast error vs fp64 at most twice the reference's own plus a floor."""
    import moe_kernels

    inputs = _case_inputs(case, dtype, device, kind, seed)
    if kind == "mlp":

        def fast(x, w1, w2, idx, gates):
            return moe_kernels.expert_mlp(x, w1, w2, idx, gates, activation, backend)

        def ref(x, w1, w2, idx, gates):
            return moe_kernels.expert_mlp_naive(x, w1, w2, idx, gates, activation)
    else:

        def fast(x, w, idx, gates):
            return moe_kernels.expert_matmul(x, w, idx, gates, backend)

        def ref(x, w, idx, gates):
            return moe_kernels.expert_matmul_naive(x, w, idx, gates)

    got, names = _outputs_and_grads(fast, inputs, seed)
    same, _ = _outputs_and_grads(ref, inputs, seed)
    exact, _ = _outputs_and_grads(ref, inputs, seed, torch.float64)
    _sync(device)
    worst = 0.0
    for name, f, r, r64 in zip(names, got, same, exact, strict=True):
        if f.shape != r64.shape or f.dtype != r.dtype:
            raise AssertionError(f"{name}: {tuple(f.shape)} {f.dtype} vs {tuple(r64.shape)}")
        if r64.numel() == 0:
            continue
        f64, r64 = f.double().cpu(), r64.double().cpu()
        err_ref = (r.double().cpu() - r64).abs().max().item()
        err = (f64 - r64).abs().max().item()
        floor = 32 * torch.finfo(dtype).eps * max(1.0, r64.abs().max().item())
        if not err <= 2 * err_ref + floor:
            raise AssertionError(f"{name}: error {err:.3g} > 2 x {err_ref:.3g} + {floor:.3g}")
        worst = max(worst, err / (2 * err_ref + floor))
    return f"worst error / allowed = {worst:.2f}"


def section_kernels(rep: Report, smoke: bool) -> None:
    device = "cpu" if smoke else "cuda"
    backend = "torch" if smoke else "auto"
    cases = SMOKE_KERNEL_CASES if smoke else KERNEL_CASES
    dtypes = {"fp32": torch.float32} if smoke else DTYPES
    for i, case in enumerate(cases):
        for dname, dtype in dtypes.items():
            for kind in ("mlp", "matmul_gated", "matmul_per_slot"):
                act = ACTIVATIONS[i % 3]
                name = f"{kind}{'[' + act + ']' if kind == 'mlp' else ''} {dname} {case}"
                rep.run(name, _check_against_reference, case, dtype, kind, act, backend, device, i)


# ---- cupy ----


def _cupy_matches_torch(T, K, E):
    import moe_kernels

    idx = torch.rand(T, E, device="cuda").argsort(dim=1)[:, :K]
    a = moe_kernels.sort_by_expert(idx, E, backend="cupy")
    b = moe_kernels.sort_by_expert(idx, E, backend="torch")
    for name, x, y in zip(a._fields, a, b, strict=True):
        if not torch.equal(x, y):
            raise AssertionError(f"{name} differs from the torch sort")
    return ""


def section_cupy(rep: Report, smoke: bool) -> None:
    if smoke:
        rep.add("cupy vs torch sort", "skip", detail="needs CUDA")
        return
    try:
        import cupy  # noqa: F401
    except Exception as e:
        rep.add("cupy vs torch sort", "skip", detail=f"cupy does not import: {e}")
        return
    for T, K, E in [(0, 2, 4), (1, 1, 3), (777, 3, 11), (32768, 4, 128)]:
        rep.run(f"cupy vs torch sort T={T} K={K} E={E}", _cupy_matches_torch, T, K, E)


# ---- layers ----


def _layers(D: int, T: int, vocab: int) -> dict:
    import moe_layers as L

    return {
        "DenseFFN": (L.DenseFFN(D, 4 * D), {}),
        "SigmaMoE": (L.SigmaMoE(D, 8, D // 2, 2, entropy_weight=1e-3), {}),
        "TopKFFN": (L.TopKFFN(D, 4 * D, 16), {}),
        "PKM": (L.PKM(D, n_keys=16, n_heads=2, knn=8), {}),
        "SwitchMoE": (L.SwitchMoE(D, 8, D // 2, capacity_factor=1.5), {}),
        "SBaseMoE": (L.SBaseMoE(D, 8, D // 2, 2, entropy_weight=1e-3), {}),
        "GShardMoE": (L.GShardMoE(D, 8, D // 2), {}),
        "BaseLayer": (L.BaseLayer(D, 8, D // 2), {}),
        "HashLayer": (L.HashLayer(D, 8, D // 2, vocab_size=vocab), {"token_ids": True}),
        "TMoE": (L.TMoE(D, 8, D // 2), {}),
        "SMoE": (L.SMoE(D, 2, seq_len=T), {}),
        "CausalSGU": (L.CausalSGU(D, seq_len=T), {}),
    }


def _layer_fwd_bwd(layer, extra, device, D, T, vocab):
    from moe_layers import collect_aux_losses

    layer = layer.to(device).train()
    x = torch.randn(2, T, D, device=device, requires_grad=True)
    kwargs = {}
    if extra.get("token_ids"):
        kwargs["token_ids"] = torch.randint(0, vocab, (2, T), device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x, **kwargs)
        loss = y.float().pow(2).mean() + sum(collect_aux_losses(layer).values())
    loss.backward()
    bad = [
        n for n, p in layer.named_parameters() if p.grad is not None and not p.grad.isfinite().all()
    ]
    if not torch.isfinite(y.float()).all() or bad or x.grad is None:
        raise AssertionError(f"non-finite output or gradients {bad[:3]}")
    return f"out {tuple(y.shape)} {y.dtype}"


def section_layers(rep: Report, smoke: bool) -> None:
    device = "cpu" if smoke else "cuda"
    D, T, vocab = (16, 8, 50) if smoke else (256, 128, 1000)
    try:
        layers = _layers(D, T, vocab)
    except Exception as e:
        rep.add("build the layers", "fail", detail=f"{type(e).__name__}: {e}")
        return
    for name, (layer, extra) in layers.items():
        rep.run(f"{name} fwd+bwd bf16 autocast", _layer_fwd_bwd, layer, extra, device, D, T, vocab)


# ---- models ----


def _model_step(preset: str, device: str, sync_debug: bool):
    import moe_models

    torch.manual_seed(0)
    model = moe_models.build(preset).to(device).train()
    cfg = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1), device=device)

    def step():
        out = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return out.loss

    step()  # warm-up: Triton autotuning and lazy initialisation may synchronise
    if sync_debug:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        if sync_debug:
            torch.cuda.set_sync_debug_mode("default")
    if not torch.isfinite(loss).item():
        raise AssertionError(f"loss {loss.item()}")
    return f"loss {loss.item():.4f}" + (" (no host synchronisation)" if sync_debug else "")


def section_models(rep: Report, smoke: bool) -> None:
    device = "cpu" if smoke else "cuda"
    for preset in ("tiny-sigma-moe", "tiny-gshard"):
        rep.run(f"{preset} training step", _model_step, preset, device, not smoke)


# ---- compile ----


def _compiled_matches_eager(device: str, backend: str):
    import moe_layers

    torch.manual_seed(0)
    D = 16 if device == "cpu" else 256
    layer = moe_layers.SigmaMoE(D, 8, D // 2, 2).to(device).eval()
    x = torch.randn(4, 32, D, device=device)
    compiled = torch.compile(layer, backend=backend, fullgraph=False)
    results = []
    for fn in (layer, compiled):
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        y = fn(xx)
        y.pow(2).sum().backward()
        results.append([y.detach(), xx.grad, *(p.grad for p in layer.parameters())])
    worst = 0.0
    for a, b in zip(*results, strict=True):
        if a is None or b is None:
            continue
        err = (a - b).abs().max().item() / max(1e-6, a.abs().max().item())
        worst = max(worst, err)
    if worst > 1e-3:
        raise AssertionError(f"compiled differs from eager: relative error {worst:.3g}")
    return f"relative error {worst:.2g} ({backend})"


def section_compile(rep: Report, smoke: bool) -> None:
    device, backend = ("cpu", "aot_eager") if smoke else ("cuda", "inductor")
    rep.run("SigmaMoE compiled vs eager", _compiled_matches_eager, device, backend)


# ---- generate (issue 22) ----

GENERATE_PAIR = ("sigma-moe-wt103-small", "dense-wt103-small")
SMOKE_GENERATE_PAIR = ("tiny-sigma-moe", "tiny-dense")


def _pair_models(smoke: bool, device: str) -> dict:
    import moe_models

    models = {}
    # smoke: small enough for the test of this script (vocabulary 8000 as in bench/ otherwise)
    sizes = dict(vocab_size=256, mem_len=8, seq_len=8) if smoke else dict(vocab_size=8000)
    for name in SMOKE_GENERATE_PAIR if smoke else GENERATE_PAIR:
        torch.manual_seed(0)
        cfg = moe_models.get_config(name, dropout=0.0, **sizes)
        models[name] = moe_models.build(cfg).to(device)
    return models


def _step_peak_memory(smoke: bool, device: str) -> dict:
    """Peak allocated memory of a training step (forward and backward, batch 2 x 256) above
    the built model, σ-MoE over dense (issue 22's target: at most 0.85)."""
    peaks = {}
    for name, model in _pair_models(smoke, device).items():
        model.train()
        vocab, length = model.config.vocab_size, model.config.seq_len
        tokens = torch.randint(0, vocab, (2, length + 1), device=device)
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()  # warm-up: lazy allocations
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peaks[name] = float("nan")  # no allocator statistics on the CPU: bench/ measures RSS
        del model
    moe, dense = peaks.values()
    return {"detail": f"{moe:.0f} MiB vs {dense:.0f} MiB: {moe / dense:.2f}x dense (target 0.85)"}


def _decode_ms(model, batch: int, new: int, compiled: bool, device: str) -> float:
    """Median ms of a decode step with the memory already full. Eager: the XLCache state.
    Compiled (torch.compile mode="reduce-overhead", CUDA graphs; smoke: backend "eager"): the
    memory state, whose tensors keep one shape once the memory is full."""
    from moe_models.generate import feed

    model.eval()
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (batch, cfg.memory_length), device=device)
    times = []
    with torch.no_grad():
        if compiled:
            options = {"backend": "eager"} if device == "cpu" else {"mode": "reduce-overhead"}
            step = torch.compile(model, dynamic=False, **options)
            state = model(prompt).state
        else:
            step = model
            state = feed(model, prompt, model.init_state()).state
        token = prompt[:, -1:]
        for i in range(new + 3):  # 3 warm-up steps: compilation, graph capture
            _sync(device)
            started = time.perf_counter()
            out = step(token, state=state)
            state = out.state
            token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            if i >= 3:
                times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def _decode_pair(smoke: bool, device: str, batch: int, compiled: bool) -> dict:
    new = 2 if smoke else 32
    ms = {
        name: _decode_ms(model, batch, new, compiled, device)
        for name, model in _pair_models(smoke, device).items()
    }
    moe, dense = ms.values()
    return {"detail": f"{moe:.3g} ms vs {dense:.3g} ms a step: {moe / dense:.2f}x dense"}


def section_generate(rep: Report, smoke: bool) -> None:
    device = "cpu" if smoke else "cuda"
    rep.run("training step peak memory, σ-MoE vs dense", _step_peak_memory, smoke, device)
    for batch in (1,) if smoke else (1, 8):
        for compiled in (False, True):
            mode = "compiled reduce-overhead" if compiled else "eager, XLCache"
            rep.run(
                f"decode batch {batch} {mode}, σ-MoE vs dense",
                _decode_pair,
                smoke,
                device,
                batch,
                compiled,
            )


# ---- bench ----


def _scattermoe_mlp(D, G, E, K, device, dtype):
    """ScatterMoE's MLP when the package imports, else None."""
    try:
        from scattermoe.mlp import MLP
    except Exception:
        return None
    return MLP(D, G, E, K, activation=torch.nn.ReLU()).to(device, dtype)


def _time_cuda(fns: dict, repeats: int, device: str) -> dict:
    """Median ms per callable, interleaved; CUDA events on CUDA, perf_counter on the CPU."""
    for fn in fns.values():
        fn()
    _sync(device)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def _bench_shape(results: dict, shape, device, dtype, repeats):
    """Times the impls at one shape into results[shape] (name -> median ms); the row's columns."""
    import moe_kernels
    from bench_kernels import _fwd_bwd, _grouped_mm_mlp, _inputs

    T, D, E, G, K = shape
    inp = _inputs(shape, dtype, device)
    idx, gates = inp["idx"], inp["gates"]
    impls = {
        "expert_mlp": (lambda x, a, b: moe_kernels.expert_mlp(x, a, b, idx, gates), (inp["w1"], inp["w2"])),
        "dense_flops": (lambda x, a, b: F.relu(x @ a) @ b, inp["dense_flops"][:2]),
        "grouped_mm": (lambda x, a, b: _grouped_mm_mlp(x, a, b, idx, gates), (inp["w1"], inp["w2"])),
    }  # fmt: skip
    fns = {name: _fwd_bwd(fn, inp["x"], ws) for name, (fn, ws) in impls.items()}
    scatter, note = _scattermoe_mlp(D, G, E, K, device, dtype), ""
    if scatter is not None:
        x = inp["x"].detach().requires_grad_()

        def scatter_step():
            y = scatter(x, gates, idx)
            y.backward(torch.ones_like(y))

        try:  # its API may differ between versions: a failure costs only its own column
            scatter_step()
            fns["scattermoe"] = scatter_step
        except Exception as e:
            note = f"  scattermoe failed: {type(e).__name__}: {e}"
    times = _time_cuda(fns, repeats, device)
    flops = 3 * 4 * T * K * D * G
    results[shape] = times
    return {
        "detail": "  ".join(f"{n} {ms:.3g} ms {flops / ms / 1e9:.3g} TFLOP/s" for n, ms in times.items())
        + note,
        **{f"{n}_ms": ms for n, ms in times.items()},
        "x_dense": times["expert_mlp"] / times["dense_flops"],
    }  # fmt: skip


def section_bench(rep: Report, smoke: bool) -> None:
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    shapes = SMOKE_SHAPES if smoke else GPU_SHAPES
    results: dict = {}
    repeats = 3 if smoke else 10
    for shape in shapes:
        rep.run(f"expert_mlp fwd+bwd {shape}", _bench_shape, results, shape, device, dtype, repeats)
    first = shapes[0]
    if first in results:
        ratio = results[first]["expert_mlp"] / results[first]["dense_flops"]
        status = "pass" if ratio <= 2.0 else "fail"
        rep.add(f"target: within 2.0x of dense at {first}", status, detail=f"{ratio:.2f}x dense")
    else:
        rep.add(f"target: within 2.0x of dense at {first}", "skip", detail="not measured")
    for shape in shapes:
        check = f"target: faster than torch._grouped_mm at {shape}"
        if shape not in results:
            rep.add(check, "skip", detail="not measured")
            continue
        ours, theirs = results[shape]["expert_mlp"], results[shape]["grouped_mm"]
        status = "pass" if ours < theirs else "fail"
        rep.add(check, status, detail=f"{ours:.3g} ms vs {theirs:.3g} ms ({theirs / ours:.2f}x)")


# ---- fsdp2 ----


def _fsdp2_step(smoke: bool):
    """One training step of sigma-moe-wt103-small (tiny-sigma-moe in the smoke run) under
    moe-train's FSDP2 path on one GPU (bf16 parameters, fp32 reduction) against today's 1-process
    path (fp32 weights under bf16 autocast), interleaved; peak memory of each."""
    import copy

    import moe_models
    import torch.distributed as dist
    from moe_train.config import TrainConfig
    from moe_train.parallelize import Layout, apply_fsdp
    from torch.distributed.device_mesh import init_device_mesh

    device = "cpu" if smoke else "cuda"
    preset = "tiny-sigma-moe" if smoke else "sigma-moe-wt103-small"
    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("gloo" if smoke else "nccl", store=store, rank=0, world_size=1)
    torch.manual_seed(0)
    plain = moe_models.build(preset).to(device).train()
    cfg = plain.config
    sharded = copy.deepcopy(plain)
    mesh = init_device_mesh(device, (1, 1, 1), mesh_dim_names=("dp_replicate", "efsdp", "ep"))
    mesh["efsdp", "ep"]._flatten("dp_shard")
    layout = Layout(1, 1, 1)
    train = TrainConfig(param_dtype="bf16", reduce_dtype="fp32")
    apply_fsdp(sharded, mesh, layout, train)
    tokens = torch.randint(0, cfg.vocab_size, (4 if smoke else 16, cfg.seq_len + 1), device=device)
    optimizers = {
        "today (autocast bf16)": torch.optim.AdamW(plain.parameters(), lr=1e-4),
        "fsdp2 bf16": torch.optim.AdamW(sharded.parameters(), lr=1e-4),
    }
    peaks = {}

    def stepper(name, model, autocast):
        def step():
            ctx = torch.autocast(device, dtype=torch.bfloat16, enabled=autocast)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with ctx:
                out = model(tokens[:, :-1], tokens[:, 1:])
            out.loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if device == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated() / 2**30
            return out.loss

        return step

    ms = _time_cuda(
        {
            "today (autocast bf16)": stepper("today (autocast bf16)", plain, True),
            "fsdp2 bf16": stepper("fsdp2 bf16", sharded, False),
        },
        repeats=2 if smoke else 10,
        device=device,
    )
    return "; ".join(
        f"{name}: {t:.1f} ms/step" + (f", peak {peaks[name]:.2f} GiB" if name in peaks else "")
        for name, t in ms.items()
    )


def section_fsdp2(rep: Report, smoke: bool) -> None:
    rep.run("sigma-moe-wt103-small step: FSDP2 bf16 vs today", _fsdp2_step, smoke)


SECTIONS = {
    "kernels": section_kernels,
    "cupy": section_cupy,
    "layers": section_layers,
    "models": section_models,
    "compile": section_compile,
    "generate": section_generate,
    "bench": section_bench,
    "fsdp2": section_fsdp2,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON file")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="every section on the CPU with tiny shapes"
    )
    parser.add_argument(
        "--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS),
        help="the sections to run (default all)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, nothing to check (--cpu-smoke runs it on the CPU)")
        return 0
    started = time.perf_counter()
    rep = Report()
    for name in args.sections:
        rep.start(name)
        try:
            SECTIONS[name](rep, args.cpu_smoke)
        except Exception as e:
            rep.add(f"section {name}", "fail", detail=f"{type(e).__name__}: {e}")
    from run import print_table

    print_table("gpu_check", [{k: v for k, v in r.items() if k != "detail" or v} for r in rep.rows])
    counts = {s: sum(r["status"] == s for r in rep.rows) for s in ("pass", "fail", "skip")}
    meta = {
        "machine": platform.node(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_smoke": args.cpu_smoke,
        "seconds": round(time.perf_counter() - started, 1),
        **counts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rep.rows}, indent=2, default=str))
    print(f"\n{counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skip "
          f"in {meta['seconds']} s -> {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
