"""End-to-end training throughput on the CPU: tiny σ-MoE against its parameter-equal dense twin.

A step is what `moe-train train` does per optimiser step (batch from the data stream, forward
with Transformer-XL memory, backward, clipping, AdamW, schedule), timed round-robin between the
two models so that machine noise hits both alike. Rows report tokens per second of training.
"""

import tempfile
from pathlib import Path

import moe_models
import torch
from moe_train.config import resolve
from moe_train.trainer import Trainer, TrainOptions
from timing import time_interleaved

PAIRS = {"tiny-sigma-moe": [], "tiny-dense (twin)": ["ffn=dense"]}


def _trainer(overrides: list[str], batch_size: int, out: Path) -> Trainer:
    cfg = resolve(
        preset="tiny-sigma-moe",
        overrides=[*overrides, f"train.batch_size={batch_size}", "train.device=cpu"],
    )
    return Trainer(cfg, TrainOptions(out_dir=out, progress=False, tensorboard=False))


def run(quick: bool) -> list[dict]:
    batch_size = 8 if quick else 16
    repeats = 5 if quick else 20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            name: _trainer(over, batch_size, Path(tmp) / str(i))
            for i, (name, over) in enumerate(PAIRS.items())
        }
        timings = time_interleaved(
            {name: t.train_step for name, t in trainers.items()}, repeats=repeats, warmup=3
        )
        for name, t in trainers.items():
            tokens = batch_size * t.cfg.model.seq_len
            counts = moe_models.count_parameters(t.cfg.model)
            ms = timings[name]
            rows.append(
                {
                    "model": name,
                    "params_total": counts["total"],
                    "params_active": counts["active"],
                    "tokens_per_step": tokens,
                    "step_ms_median": ms["median_ms"],
                    "step_ms_min": ms["min_ms"],
                    "step_ms_max": ms["max_ms"],
                    "tokens_per_s": tokens / (ms["median_ms"] / 1e3),
                    "threads": torch.get_num_threads(),
                }
            )
    dense = rows[1]["tokens_per_s"]
    for row in rows:
        row["speed_vs_dense"] = row["tokens_per_s"] / dense
    return rows
