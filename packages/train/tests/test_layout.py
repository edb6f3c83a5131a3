"""The layout keys (train.dp_replicate, train.dp_shard, train.ep) resolved against the world
size, and their one-line errors; the torchrun runs are in test_distributed.py."""

import json

import pytest
import torch
from moe_train import checkpoint as ckpt
from moe_train.config import TrainConfig
from moe_train.errors import CLIError
from moe_train.parallelize import Layout, layout_for_resume, resolve_layout


@pytest.mark.parametrize(
    "keys, world, layout",
    [
        ({}, 1, Layout(1, 1, 1)),
        ({}, 4, Layout(1, 4, 1)),
        ({"ep": 2}, 4, Layout(1, 4, 2)),
        ({"dp_replicate": 2, "ep": 2}, 4, Layout(2, 2, 2)),
        ({"dp_replicate": 4}, 4, Layout(4, 1, 1)),
        ({"expert_parallel": True}, 4, Layout(1, 4, 4)),
        ({"expert_parallel": True}, 1, Layout(1, 1, 1)),
        ({"dp_shard": 2, "dp_replicate": 2}, 4, Layout(2, 2, 1)),
    ],
)
def test_layouts_resolve_against_the_world_size(keys, world, layout):
    assert resolve_layout(TrainConfig(**keys), world) == layout


@pytest.mark.parametrize(
    "keys, world, needle",
    [
        ({"dp_shard": 3}, 4, "train.dp_replicate=1 x train.dp_shard=3 = 3 ranks"),
        ({"dp_replicate": 3}, 4, "train.dp_replicate=3 does not divide the world size 4"),
        ({"ep": 3}, 4, "train.ep=3 must divide train.dp_shard=4"),
        ({"ep": 2}, 1, "train.ep=2 must divide train.dp_shard=1"),
    ],
)
def test_a_layout_that_does_not_fit_is_one_line(keys, world, needle):
    with pytest.raises(CLIError, match=needle.replace(".", r"\.")) as info:
        resolve_layout(TrainConfig(**keys), world)
    assert "\n" not in str(info.value)


def test_a_layout_on_one_process_is_a_cli_error(cli, tmp_path):
    rc, _, err = cli.train(tmp_path / "r", "--max-steps", "1", "train.dp_shard=2")
    cli.assert_one_line_error(rc, err, "the world size is 1")
    assert rc == 2


@pytest.mark.parametrize("key", ["param_dtype=fp16", "activation_checkpointing=some", "ep=0"])
def test_bad_layout_values_are_one_line(cli, tmp_path, key):
    rc, _, err = cli.train(tmp_path / "r", "--max-steps", "1", f"train.{key}")
    cli.assert_one_line_error(rc, err, f"train.{key.split('=')[0]}")


def test_activation_checkpointing_changes_no_loss_nor_routing_record(cli, tmp_path):
    """full and selective recompute each block in the backward: the same losses and routing
    records as without (the recomputation records nothing twice), parameter names unchanged."""
    common = ["--max-steps", "2", "dropout=0", "n_layers=2", "train.routing_interval=1"]
    runs = {}
    for mode in ("none", "full", "selective"):
        out = tmp_path / mode
        rc, _, err = cli.train(
            out, *common, f"train.activation_checkpointing={mode}", preset="tiny-gshard"
        )
        assert rc == 0, err
        runs[mode] = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in cli.metrics(out)]
    assert runs["full"] == runs["none"] and runs["selective"] == runs["none"]
    assert any("routing" in r for r in runs["none"])


@pytest.mark.parametrize(
    "saved, given, world, layout, changed",
    [
        # what still fits is kept
        ({"ep": 2}, {}, 2, Layout(1, 2, 2), None),
        ({"dp_replicate": 2, "ep": 2}, {}, 8, Layout(2, 4, 2), None),
        # ep first, then dp_replicate / dp_shard, then all of them
        ({"ep": 2}, {}, 1, Layout(1, 1, 1), "train.ep=2 does not fit 1 process(es); resuming with train.ep=1"),
        ({"dp_shard": 4, "ep": 2}, {}, 2, Layout(1, 2, 2), "train.dp_shard=4 does not fit"),
        ({"dp_replicate": 2, "ep": 2}, {}, 2, Layout(2, 1, 1), "train.ep=2 does not fit"),
        ({"dp_replicate": 2, "ep": 2}, {}, 3, Layout(1, 3, 1), "train.dp_replicate=2, train.ep=2 does not fit 3"),
        ({"dp_replicate": 2, "ep": 2}, {}, 1, Layout(1, 1, 1), "train.dp_replicate=2, train.ep=2 does not"),
        ({"expert_parallel": True}, {}, 3, Layout(1, 3, 3), None),
        # the user's keys are kept; the saved ones give way around them
        ({"ep": 2}, {"dp_replicate": 2}, 4, Layout(2, 2, 2), None),
        ({"ep": 4}, {"dp_replicate": 2}, 4, Layout(2, 2, 1), "train.ep=4 does not fit"),
        ({"dp_replicate": 2}, {"ep": 4}, 4, Layout(1, 4, 4), "train.dp_replicate=2 does not fit"),
    ],
)  # fmt: skip
def test_a_resumed_layout_follows_the_world_size(saved, given, world, layout, changed):
    """Resuming: the layout keys the user sets win; the checkpoint's others stay where they fit
    the new world size, else fall back to the defaults with a one-line note naming them."""
    train, note = layout_for_resume(TrainConfig(**saved, **given), set(given), world)
    assert resolve_layout(train, world) == layout
    if changed is None:
        assert note is None
    else:
        assert note.startswith("note: the checkpoint's ") and changed in note, note
        assert "\n" not in note


def test_the_users_layout_that_does_not_fit_stays_an_error():
    train, note = layout_for_resume(TrainConfig(dp_replicate=2, ep=2), {"ep"}, 1)
    assert note is None
    with pytest.raises(CLIError, match=r"train\.ep=2 must divide train\.dp_shard=1"):
        resolve_layout(train, 1)


def _saved_with_layout(run, **layout) -> None:
    """Make the run's newest checkpoint (and config.json) say it was written with `layout`, as
    a torchrun run would have written it (its tensors hold global shapes in any layout)."""
    meta = ckpt.latest(run) / "meta.pt"
    payload = torch.load(meta, weights_only=True)
    payload["run_config"]["train"].update(layout)
    torch.save(payload, meta)
    (run / "config.json").write_text(json.dumps(payload["run_config"], indent=2) + "\n")


def test_resuming_an_ep_run_on_one_process_needs_no_layout_keys(cli, tmp_path):
    run = tmp_path / "r"
    rc, _, err = cli.train(run, "--max-steps", "2", "--stop-at", "1")
    assert rc == 0, err
    _saved_with_layout(run, ep=2, dp_replicate=2)
    rc, _, err = cli("train", "--out", run, "--resume", "--no-progress", "--no-tensorboard")
    assert rc == 0, err
    note = (
        "note: the checkpoint's train.dp_replicate=2, train.ep=2 does not fit 1 process(es); "
        "resuming with train.dp_replicate=1, train.ep=1 (dp_replicate=1, dp_shard=1, ep=1; set "
        "the train.* layout keys to choose another)"
    )
    assert note in err.splitlines()
    assert "Traceback" not in err
    saved = json.loads((run / "config.json").read_text())["train"]
    assert (saved["ep"], saved["dp_replicate"]) == (1, 1)
    # a layout the user asks for that does not fit this world size is one error line
    _saved_with_layout(run, ep=2)
    rc, _, err = cli("train", "--out", run, "--resume", "--max-steps", "3", "train.ep=2")
    cli.assert_one_line_error(rc, err, "train.ep=2 must divide train.dp_shard=1")
