"""Helpers for the moe-train tests: in-process CLI calls and tiny model/run settings."""

import json
from pathlib import Path

import moe_models
import pytest
from moe_train.cli import main

# a model small enough that a training step takes milliseconds on one CPU core
TINY_MODEL = [
    "d_model=32",
    "n_layers=1",
    "n_heads=2",
    "seq_len=16",
    "d_ff=64",
    "n_experts=4",
    "expert_size=16",
]


def tiny_model(preset: str) -> list[str]:
    """TINY_MODEL without the options the preset's FFN does not have (a dense FFN has no
    experts, and naming them is an error)."""
    ffn = moe_models.get_config(preset).ffn
    return [
        o
        for o in TINY_MODEL
        if o.split("=")[0] in ("d_model", "n_layers", "n_heads", "seq_len", "d_ff")
        or hasattr(ffn, o.split("=")[0])
    ]


TINY_TRAIN = [
    "--batch-size",
    "4",
    "--no-progress",
    "--no-tensorboard",
    "train.eval_batches=2",
    "train.final_eval_batches=2",
    "train.eval_batch_size=4",
    "train.warmup_steps=2",
    "train.log_interval=1",
]


class CLI:
    """Calls `moe-train` in-process; also carries the helpers the tests share (importlib mode
    does not let test modules import this file)."""

    TINY_MODEL = TINY_MODEL
    TINY_TRAIN = TINY_TRAIN
    tiny_model = staticmethod(tiny_model)

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = self.capsys.readouterr()
        return rc, out, err

    def train(self, out: Path, *extra: str, preset: str = "tiny-sigma-moe") -> tuple[int, str, str]:
        model = tiny_model(preset)
        return self("train", "--preset", preset, "--out", out, *TINY_TRAIN, *model, *extra)

    @staticmethod
    def metrics(run_dir: Path) -> list[dict]:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    @classmethod
    def losses(cls, run_dir: Path) -> dict[int, float]:
        return {r["step"]: r["train_loss"] for r in cls.metrics(run_dir) if "train_loss" in r}

    @staticmethod
    def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
        assert rc != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("error: "), err
        assert "Traceback" not in err
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def cli(capsys):
    return CLI(capsys)
