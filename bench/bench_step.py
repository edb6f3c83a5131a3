"""One training step of σ-MoE against its parameter-equal dense twin, on the CPU (issue 13).

The presets `sigma-moe-wt103-small` and `dense-wt103-small` (vocabulary 8000, dropout 0), a
forward and backward at batch 2 x 256 tokens without memory state, on 2 threads, eager and (not
with --quick) compiled with torch.compile, all four steps timed round-robin (bench/timing.py).
Rows: step time per model and mode and `x_dense`, the σ-MoE step time over the dense one in the
same mode (target: at most 0.70; their FLOPs per token are in `mflops_per_token`). The compiled
rows record their compile time (the first call); a compile that fails gives a row with its error.
On the 2-core development VM, quiet: compiling took about 135 s (σ-MoE) and 60 s (dense).
"""

from __future__ import annotations

import time

import moe_models
import torch
from timing import time_interleaved

MODELS = {"sigma_moe": "sigma-moe-wt103-small", "dense": "dense-wt103-small"}
BATCH, SEQ_LEN = 2, 256
TARGET = 0.70


def _step(model: torch.nn.Module, forward, tokens: torch.Tensor):
    def step():
        model.zero_grad(set_to_none=True)
        forward(tokens[:, :-1], tokens[:, 1:]).loss.backward()

    return step


def run(quick: bool) -> list[dict]:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    steps, info, errors = {}, {}, {}
    for name, preset in MODELS.items():
        torch.manual_seed(0)
        model = moe_models.build(preset, dropout=0.0).train()
        cfg = model.config
        tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ_LEN + 1), generator=g)
        info[name] = (preset, cfg)
        steps[(name, "eager")] = _step(model, model, tokens)
        if quick:
            continue
        compiled = torch.compile(model)
        step = _step(model, compiled, tokens)
        started = time.perf_counter()
        try:
            step()
        except Exception as e:  # a compile failure is a result to report, not a crash
            errors[(name, "compiled")] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        info[(name, "compile_s")] = time.perf_counter() - started
        steps[(name, "compiled")] = step
    times = time_interleaved(steps, repeats=3 if quick else 10, warmup=1 if quick else 2)
    load = open("/proc/loadavg").read().split()[0]
    rows = []
    for mode in ("eager", "compiled"):
        for name in MODELS:
            preset, cfg = info[name]
            row = {"model": preset, "mode": mode, "tokens": BATCH * SEQ_LEN, "load_1min": load}
            if (name, mode) in errors:
                rows.append({**row, "error": errors[(name, mode)]})
                continue
            if (name, mode) not in times:
                continue
            t = times[(name, mode)]
            dense = times.get(("dense", mode))
            rows.append(
                {
                    **row,
                    "params": moe_models.count_parameters(cfg)["total"],
                    "mflops_per_token": round(moe_models.flops_per_token(cfg) / 1e6, 1),
                    "step_ms": t["median_ms"],
                    "spread_ms": f"{t['min_ms']:.4g}-{t['max_ms']:.4g}",
                    "compile_s": info.get((name, "compile_s")) if mode == "compiled" else None,
                    "x_dense": t["median_ms"] / dense["median_ms"] if dense else None,
                    "target_x_dense": TARGET if name == "sigma_moe" else None,
                }
            )
    return rows
