"""Training throughput of every tiny preset, MoE against its parameter-equal dense twin.

One row per tiny preset: tokens/s of a full training step (forward, backward, AdamW step) at the
preset's seq_len, its parameter-equal dense twin's tokens/s (`moe_models.dense_twin`), their
ratio, the parameter counts and FLOPs per token, and peak memory on CUDA (None on the CPU). All
steps are timed round-robin (bench/timing.py) and medians reported, on one CPU thread. On CUDA the
row set repeats on the GPU, with the papers' smaller MoE presets (GPU_PRESETS) added.
"""

from __future__ import annotations

import moe_models
import torch
from timing import peak_memory_mb, time_interleaved

GPU_PRESETS = ["sigma-moe-wt103-small", "sigma-moe-enwik8"]


def _train_step(cfg, batch: int, device: str):
    torch.manual_seed(0)
    model = moe_models.build(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=g).to(device)

    def step():
        out = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def run(quick: bool) -> list[dict]:
    # one thread: on the shared 2-core machine a second thread mostly waits for the first, and
    # makes these small models' timings swing by 10x
    torch.set_num_threads(1)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    batch, repeats = (4, 3) if quick else (8, 7)
    tiny = [n for n in moe_models.presets() if n.startswith("tiny-")]
    rows = []
    for device in devices:
        # the papers' small models are worth timing only on a GPU
        names = tiny + (GPU_PRESETS if device == "cuda" else [])
        configs = {}
        for name in names:
            cfg = moe_models.get_config(name, dropout=0.0)
            configs[name] = cfg
            if cfg.ffn.type != "dense" and cfg.moe_interval:
                configs[f"{name} (dense twin)"] = moe_models.dense_twin(cfg, match="params")
        steps = {key: _train_step(cfg, batch, device) for key, cfg in configs.items()}
        times = time_interleaved(steps, repeats=repeats, device=device)
        for name in names:
            cfg = configs[name]
            tokens = batch * cfg.seq_len
            counts = moe_models.count_parameters(cfg)
            row = {
                "preset": name,
                "device": device,
                "arch": cfg.arch,
                "ffn": cfg.ffn.type if cfg.moe_interval else "none (gMLP)",
                "params": counts["total"],
                "active": counts["active"],
                "mflops_per_token": round(moe_models.flops_per_token(cfg) / 1e6, 2),
                "tokens_per_s": round(tokens / times[name]["median_ms"] * 1e3),
                "spread_ms": round(times[name]["max_ms"] - times[name]["min_ms"], 1),
                "peak_mb": peak_memory_mb(steps[name], device),
            }
            twin = f"{name} (dense twin)"
            if twin in configs:
                row["twin_params"] = moe_models.count_parameters(configs[twin])["total"]
                row["twin_tokens_per_s"] = round(tokens / times[twin]["median_ms"] * 1e3)
                row["speed_vs_twin"] = round(times[twin]["median_ms"] / times[name]["median_ms"], 2)
                row["twin_peak_mb"] = peak_memory_mb(steps[twin], device)
            rows.append(row)
    return rows
