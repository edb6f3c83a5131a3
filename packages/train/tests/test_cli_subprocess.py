"""The installed console script, and 2-process gloo training launched by torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "moe-train"


def run(argv: list, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MOE_TRAIN_DEBUG", None)
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_console_script_info_and_a_bad_preset():
    done = run([SCRIPT, "info", "--preset", "tiny-dense"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"]["arch"] == "transformer_xl"
    done = run([SCRIPT, "train", "--preset", "no-such-preset"])
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: ") and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_gloo_processes_match_one_and_their_checkpoint_resumes_on_one(cli, tmp_path):
    # no dropout: its masks necessarily differ between one process and two
    args = [
        "--max-steps",
        "6",
        "train.save_interval=3",
        *cli.TINY_TRAIN,
        *cli.TINY_MODEL,
        "dropout=0",
    ]
    single, double = tmp_path / "single", tmp_path / "double"
    rc, _, err = cli("train", "--out", single, *args)
    assert rc == 0, err
    done = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "moe_train.cli",
            "train",
            "--out",
            double,
            *args,
            "--device",
            "cpu",
        ]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = cli.losses(single), cli.losses(double)
    assert sorted(two) == list(range(1, 7))
    # same global batch and data; only the entropy regulariser sees per-rank batches
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-3), step
    saved = json.loads((double / "config.json").read_text())
    assert saved["train"]["batch_size"] == 4
    rc, _, err = cli(
        "train",
        "--out",
        double,
        "--resume",
        "--max-steps",
        "8",
        "--no-progress",
        "--no-tensorboard",
    )
    assert rc == 0, err
    assert "2 rank(s)" in err
    assert sorted(cli.losses(double)) == list(range(1, 9))
