"""The installed console script, and 2-process gloo training launched by torchrun (DDP, and DDP with
expert parallelism)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    done = torchrun_train(double, *args, "--device", "cpu")
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


@pytest.mark.slow
def test_expert_parallel_on_two_gloo_processes_matches_one_and_checkpoints_unsharded(cli, tmp_path):
    args = [*cli.TINY_TRAIN, *cli.TINY_MODEL, "dropout=0", "--device", "cpu"]
    args += ["train.routing_interval=3"]
    quiet = ["--no-progress", "--no-tensorboard"]
    single, double = tmp_path / "single", tmp_path / "double"
    rc, _, err = cli("train", "--out", single, "--max-steps", "6", *args)
    assert rc == 0, err
    # stopped at 3 and resumed: the sharded optimiser state goes through the checkpoint too
    first = torchrun_train(double, "--max-steps", "6", "--stop-at", "3", "--expert-parallel", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "experts sharded over them" in first.stdout
    rest = torchrun_train(double, "--resume", "--max-steps", "6", "--expert-parallel", *quiet)
    assert rest.returncode == 0, rest.stderr[-3000:]
    one, two = cli.losses(single), cli.losses(double)
    assert sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-3), step
    routed = [r["routing"].keys() for r in cli.metrics(double) if "routing" in r]
    assert routed and all(keys == {"layers.0.ffn.ffn"} for keys in routed)
    # the checkpoint is the unsharded layout of a 1-process run: same keys and shapes
    name = "checkpoints/step-00000006.pt"
    ref = torch.load(single / name, weights_only=True)
    got = torch.load(double / name, weights_only=True)
    assert list(got["model"]) == list(ref["model"])
    for key, value in ref["model"].items():
        torch.testing.assert_close(got["model"][key], value, rtol=2e-3, atol=2e-3)
    for index, state in ref["optimizer"]["state"].items():
        for key, value in state.items():
            assert got["optimizer"]["state"][index][key].shape == value.shape, (index, key)
    rc, _, err = cli("train", "--out", double, "--resume", "--max-steps", "8", *quiet)
    assert rc == 0, err
    assert sorted(cli.losses(double)) == list(range(1, 9))
    rc, _, err = cli("eval", double, "--max-batches", "2", "--batch-size", "4", "--device", "cpu")
    assert rc == 0, err
