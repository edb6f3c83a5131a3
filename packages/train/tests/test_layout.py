"""The layout keys (train.dp_replicate, train.dp_shard, train.ep) resolved against the world
size, and their one-line errors; the torchrun runs are in test_distributed.py."""

import pytest
from moe_train.config import TrainConfig
from moe_train.errors import CLIError
from moe_train.parallelize import Layout, resolve_layout


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
