"""Checkpoint folders: complete or absent, pruning, validation and RNG state round trips."""

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
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


def test_save_then_load_round_trip_latest_and_best(tmp_path):
    manager = ckpt.CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    for step in (1, 2, 3):
        manager.save(payload(step), step, is_best=step == 2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best", "step-00000002", "step-00000003"]
    latest = ckpt.load(tmp_path)
    assert latest["step"] == 3 and torch.equal(latest["model"]["w"], torch.full((3,), 3.0))
    best = ckpt.load(tmp_path / "checkpoints" / "best")
    assert best["step"] == 2 and torch.equal(best["model"]["w"], torch.full((3,), 2.0))
    # best shares the step folder's files (hard links), it is no second copy
    step2 = tmp_path / "checkpoints" / "step-00000002" / ckpt.META
    assert (tmp_path / "checkpoints" / "best" / ckpt.META).stat().st_ino == step2.stat().st_ino
    assert ckpt.load(tmp_path, tensors=False).keys() >= {"run_config", "step", "path"}
    assert "model" not in ckpt.load(tmp_path, tensors=False)


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    manager = ckpt.CheckpointManager(tmp_path / "checkpoints", keep_last=5)
    manager.save(payload(1), 1)
    real_save = dcp.save

    def dying_save(state, checkpoint_id, **kwargs):
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)
        for f in Path(checkpoint_id).iterdir():
            f.write_bytes(f.read_bytes()[:10])  # half-written shards, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(dcp, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        manager.save(payload(2), 2)
    monkeypatch.undo()
    assert ckpt.latest(tmp_path).name == "step-00000001"
    assert ckpt.load(tmp_path)["step"] == 1
    manager.save(payload(3), 3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000001", "step-00000003"]


def test_stray_temporary_folders_are_not_checkpoints_and_get_cleaned(tmp_path):
    d = tmp_path / "checkpoints"
    (d / f"{ckpt.TMP_PREFIX}step-00000009").mkdir(parents=True)
    (d / f"{ckpt.TMP_PREFIX}step-00000009" / ckpt.META).write_bytes(b"partial")
    assert ckpt.latest(tmp_path) is None
    ckpt.CheckpointManager(d, keep_last=1).save(payload(5), 5)
    assert sorted(p.name for p in d.iterdir()) == ["step-00000005"]


@pytest.mark.parametrize("part", [ckpt.META, ckpt.DCP_METADATA, "__0_0.distcp"])
@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "foreign"])
def test_damaged_or_foreign_folders_are_one_line_errors_naming_them(tmp_path, damage, part):
    folder = tmp_path / "checkpoints" / "step-00000001"
    ckpt.CheckpointManager(folder.parent, keep_last=1).save(payload(1), 1)
    path = folder / part
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 10)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        foreign = io.BytesIO()
        torch.save({"weights": torch.zeros(2)}, foreign)
        path.write_bytes(foreign.getvalue())
    with pytest.raises(CLIError) as info:
        ckpt.load(folder)
    message = str(info.value)
    assert str(folder) in message and "\n" not in message


def legacy_file(path: Path, version: int = 2, **payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": ckpt.FORMAT, "version": version, **payload}, path)
    return path


def test_files_of_format_2_load_their_model_but_do_not_resume(tmp_path):
    run = tmp_path / "run"
    for step in (3, 12):
        legacy_file(run / "checkpoints" / f"step-{step:08d}.pt", **payload(step))
    for where in (run, run / "checkpoints", run / "checkpoints" / "step-00000012.pt"):
        loaded = ckpt.load(where)
        assert loaded["step"] == 12 and torch.equal(loaded["model"]["w"], torch.full((3,), 12.0))
    with pytest.raises(CLIError, match="resumes only from folders of version 3") as info:
        ckpt.load_newest(run, tensors=False)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "version, content, match",
    [
        (1, payload(1), "format version 1, expected 3 .a folder. or 2 .a file."),
        (2, {"step": 1}, "incomplete: missing run_config, model"),
    ],
)
def test_a_file_of_another_format_or_incomplete_is_a_one_line_error(
    tmp_path, version, content, match
):
    old = legacy_file(tmp_path / "step-00000001.pt", version, **content)
    with pytest.raises(CLIError, match=match):
        ckpt.load(old)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CLIError, match="checkpoints are folders"):
        ckpt.load(other)


def test_a_run_of_format_2_evaluates_and_generates(cli, tmp_path):
    from moe_train import loading

    run = tmp_path / "run"
    assert cli.train(run, "--max-steps", "2", preset="tiny-dense")[0] == 0
    new = ckpt.load(run)
    old = tmp_path / "old"
    old.mkdir()
    for f in run.iterdir():
        if f.is_file():
            (old / f.name).write_bytes(f.read_bytes())
    legacy_file(
        old / "checkpoints" / "step-00000002.pt",
        **{k: new[k] for k in ("run_config", "model", "step")},
    )
    model = loading.load(old, device="cpu").model
    for name, value in model.state_dict().items():
        assert torch.equal(value, new["model"][name]), name
    rc, out, err = cli("generate", old, "--prompt", "The", "--max-new-tokens", "3", "--seed", "1")
    assert rc == 0, err


def test_write_makes_a_one_process_checkpoint_folder(tmp_path):
    path = ckpt.write(payload(4), tmp_path / "made")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made"]
    assert ckpt.load(path)["step"] == 4


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CLIError, match="nope"):
        ckpt.load(tmp_path / "nope")
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


def test_async_checkpoints_resume_like_the_synchronous_ones(cli, tmp_path):
    common = ["--max-steps", "6", "train.save_interval=2", "dropout=0.1"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert cli.train(straight, *common, preset="tiny-gshard")[0] == 0
    rc, _, err = cli.train(
        run, *common, "--stop-at", "4", "train.async_checkpoint=true", preset="tiny-gshard"
    )
    assert rc == 0, err
    # the last save completes before the run ends
    assert [p.name for _, p in ckpt.step_files(run / "checkpoints")] == [
        "step-00000002",
        "step-00000004",
    ]
    rc, _, err = cli("train", "--out", run, "--resume", "--no-progress", "--no-tensorboard")
    assert rc == 0, err
    assert cli.losses(run) == cli.losses(straight)
