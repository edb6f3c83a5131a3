"""Layouts on CPU gloo (torchrun, 4 processes): step time and per-rank state memory of FSDP2,
FSDP2 with expert parallelism and HSDP, against one process and against the old DDP path.

Report only, no target: 4 processes on a small shared CPU measure mostly the collectives'
overhead, not what the layouts do on GPUs. The work is in layouts_worker.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(quick: bool) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = subprocess.run(
        [
            *launcher,
            "--nproc_per_node",
            "4",
            str(HERE / "layouts_worker.py"),
            "3" if quick else "10",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if done.returncode:
        raise RuntimeError(f"layouts_worker failed: {done.stderr[-2000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    base = next(r for r in rows if r["layout"] == "1 process")
    for r in rows:
        r["state_vs_1_process"] = r["state_MiB_per_rank"] / base["state_MiB_per_rank"]
    return rows
