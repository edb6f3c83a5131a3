"""Checkpoint files: atomic replacement, pruning, validation and RNG state round trips."""

import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_train import checkpoint as ckpt
from moe_train.errors import CLIError


def payload(step: int) -> dict:
    return {
        "run_config": {"preset": "p"},
        "model": {"w": torch.full((3,), float(step))},
        "step": step,
    }


def test_save_then_load_round_trip_and_latest(tmp_path):
    manager = ckpt.CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    for step in (1, 2, 3):
        manager.save(payload(step), step, is_best=step == 2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "step-00000002.pt", "step-00000003.pt"]
    latest = ckpt.load(tmp_path)
    assert latest["step"] == 3 and torch.equal(latest["model"]["w"], torch.full((3,), 3.0))
    assert ckpt.load(tmp_path / "checkpoints" / "best.pt")["step"] == 2


def test_interrupted_save_keeps_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt.atomic_save({"format": ckpt.FORMAT, "version": ckpt.VERSION, **payload(1)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def dying_save(obj, f):
        real_save(obj, f)
        f.truncate(10)  # half-written file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"format": ckpt.FORMAT, "version": ckpt.VERSION, **payload(2)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert ckpt.load(path)["step"] == 1


def test_stray_temporary_files_are_not_checkpoints_and_get_cleaned(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    (d / f"{ckpt.TMP_PREFIX}abc.pt").write_bytes(b"partial")
    assert ckpt.latest(tmp_path) is None
    ckpt.CheckpointManager(d, keep_last=1).save(payload(5), 5)
    assert sorted(p.name for p in d.iterdir()) == ["step-00000005.pt"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "foreign"])
def test_damaged_or_foreign_files_are_one_line_errors_naming_the_file(tmp_path, damage):
    path = tmp_path / "checkpoints" / "step-00000001.pt"
    ckpt.CheckpointManager(path.parent, keep_last=1).save(payload(1), 1)
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 10)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CLIError) as info:
        ckpt.load(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CLIError, match="nope.pt"):
        ckpt.load(tmp_path / "nope.pt")
    with pytest.raises(CLIError, match="no checkpoint"):
        ckpt.load(tmp_path)


@given(seed=st.integers(0, 2**31 - 1), draws=st.integers(0, 5))
def test_rng_state_round_trips_through_a_weights_only_file(tmp_path_factory, seed, draws):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    for _ in range(draws):
        random.random(), np.random.rand(), torch.rand(1)
    path = tmp_path_factory.mktemp("rng") / "rng.pt"
    ckpt.atomic_save({"rng": ckpt.rng_state()}, path)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.set_rng_state(torch.load(path, weights_only=True)["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert (
        expected[0] == again[0] and expected[1] == again[1] and torch.equal(expected[2], again[2])
    )
