"""Peak memory of a training step on the CPU: σ-MoE against its dense twin (issue 22).

`sigma-moe-wt103-small` and `dense-wt103-small` (vocabulary 8000, dropout 0), a forward and
backward at batch 2 x 256 tokens without memory state, one thread; each measurement in a fresh
process with glibc's mmap threshold at 64 KiB (MALLOC_MMAP_THRESHOLD_=65536: freed blocks go
back to the system, so the peak RSS is the step's peak and not the allocator's leftovers), the
models alternating, three processes each (one with --quick). A process builds the model, resets
its peak RSS (/proc/self/clear_refs), runs two steps (gradients set to None between them) and
reports its peak RSS above the built model's RSS. Rows: the median per model and `x_dense`, the
σ-MoE peak over the dense one (target: at most 0.85). Linux only (reads /proc).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

MODELS = {"sigma_moe": "sigma-moe-wt103-small", "dense": "dense-wt103-small"}
BATCH, SEQ_LEN = 2, 256
TARGET = 0.85

CHILD = rf"""
import gc, json, sys
import moe_models, torch

def rss_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

torch.set_num_threads(1)
torch.manual_seed(0)
cfg = moe_models.get_config(sys.argv[1], vocab_size=8000, dropout=0.0)
model = moe_models.build(cfg).train()
g = torch.Generator().manual_seed(0)
tokens = torch.randint(0, 8000, ({BATCH}, {SEQ_LEN} + 1), generator=g)
gc.collect()
built = rss_mib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
for _ in range(2):
    model.zero_grad(set_to_none=True)
    model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
print(json.dumps({{"built_mib": built, "peak_above_model_mib": rss_mib("VmHWM") - built}}))
"""


def _measure(preset: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, preset], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool) -> list[dict]:
    runs = 1 if quick else 3
    samples = {key: [] for key in MODELS}
    for _ in range(runs):
        for key, preset in MODELS.items():
            samples[key].append(_measure(preset))
    peaks = {k: statistics.median(s["peak_above_model_mib"] for s in v) for k, v in samples.items()}
    rows = []
    for key, preset in MODELS.items():
        values = [round(s["peak_above_model_mib"], 1) for s in samples[key]]
        rows.append(
            {
                "model": preset,
                "batch": f"{BATCH} x {SEQ_LEN}",
                "peak_above_model_mib": round(peaks[key], 1),
                "runs_mib": values,
                "built_model_rss_mib": round(samples[key][0]["built_mib"], 1),
                "x_dense": round(peaks[key] / peaks["dense"], 3),
                "target": TARGET if key == "sigma_moe" else None,
            }
        )
    return rows
