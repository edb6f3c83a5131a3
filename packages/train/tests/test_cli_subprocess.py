"""The installed console script (torchrun runs: test_distributed.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "moe-train"


def run(argv: list, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MOE_TRAIN_DEBUG", None)
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, env=env
    )


def torchrun_train(out: Path, *args) -> subprocess.CompletedProcess:
    module = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    return run([sys.executable, *module, "moe_train.cli", "train", "--out", out, *args])


def test_console_script_info_and_a_bad_preset():
    done = run([SCRIPT, "info", "--preset", "tiny-dense"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"]["arch"] == "transformer_xl"
    done = run([SCRIPT, "train", "--preset", "no-such-preset"])
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
