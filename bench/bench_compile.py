"""Training throughput of `moe-train train --compile` (train.compile, torch.compile's default
inductor backend) against the eager trainer, on the tiny presets on the CPU.

For each preset two trainers with the same configuration, eager and compiled; each runs warmup
steps first (the compiled one compiles there: for Transformer-XL once without and once with the
memory), then their `train_step`s are timed round-robin (bench/timing.py) so that machine noise
hits both alike. Rows: tokens per second of each and `speedup` (compiled over eager), and the
compile time (the warmup of the compiled trainer minus that of the eager one). A preset whose
compilation fails gives a row with its error.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from moe_train.config import resolve
from moe_train.trainer import Trainer, TrainOptions
from timing import time_interleaved

PRESETS = ["tiny-sigma-moe", "tiny-dense", "tiny-switch", "tiny-gshard", "tiny-base", "tiny-smlp"]
QUICK_PRESETS = ["tiny-sigma-moe", "tiny-gshard"]
WARMUP = 3


def _trainer(preset: str, compiled: bool, batch_size: int, out: Path) -> Trainer:
    overrides = [f"train.batch_size={batch_size}", "train.device=cpu"]
    overrides.append(f"train.compile={str(compiled).lower()}")
    cfg = resolve(preset=preset, overrides=overrides)
    return Trainer(cfg, TrainOptions(out_dir=out, progress=False, tensorboard=False))


def _warm(trainer: Trainer) -> float:
    trainer.model.train()
    started = time.perf_counter()
    for _ in range(WARMUP):
        trainer.train_step()
    return time.perf_counter() - started


def _compare(preset: str, trainers: dict, batch_size: int, repeats: int) -> dict:
    warm = {mode: _warm(t) for mode, t in trainers.items()}
    times = time_interleaved(
        {mode: t.train_step for mode, t in trainers.items()}, repeats=repeats, warmup=0
    )
    tokens = batch_size * trainers["eager"].cfg.model.seq_len
    row = {"preset": preset, "tokens_per_step": tokens}
    for mode, ms in times.items():
        row[f"{mode}_tok_s"] = tokens / (ms["median_ms"] / 1e3)
        row[f"{mode}_ms_min"] = ms["min_ms"]
        row[f"{mode}_ms_max"] = ms["max_ms"]
    row["speedup"] = row["compiled_tok_s"] / row["eager_tok_s"]
    row["compile_s"] = warm["compiled"] - warm["eager"]
    row["load"] = float(open("/proc/loadavg").read().split()[0])
    return row


def run(quick: bool) -> list[dict]:
    torch.set_num_threads(2)
    batch_size = 8 if quick else 16
    repeats = 5 if quick else 15
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in QUICK_PRESETS if quick else PRESETS:
            trainers = {
                mode: _trainer(preset, mode == "compiled", batch_size, Path(tmp) / preset / mode)
                for mode in ("eager", "compiled")
            }
            try:
                rows.append(_compare(preset, trainers, batch_size, repeats))
            except Exception as e:  # a compile failure is a result to report, not a crash
                rows.append({"preset": preset, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            finally:
                for t in trainers.values():
                    t.close()
    return rows
