"""Layers users bring: a plugin file registers a layer, the CLI trains, evaluates and resumes it."""

import json
from pathlib import Path

import pytest
from moe_train import checkpoint

PLUGIN = Path(__file__).with_name("toy_plugin.py")


def test_a_plugin_layer_trains_evaluates_and_resumes(cli, tmp_path):
    run = tmp_path / "run"
    args = ["--plugin", PLUGIN, "ffn=toy", "ffn.width=12", "--max-steps", "4", "--stop-at", "2"]
    rc, out, err = cli.train(run, *args, preset="tiny-dense")
    assert rc == 0, err
    saved = json.loads((run / "config.json").read_text())
    assert saved["plugins"] == [str(PLUGIN.resolve())]
    assert saved["model"]["ffn"] == {"type": "toy", "width": 12, "l2_weight": 0.1}
    ckpt = checkpoint.load(run / "checkpoints" / "step-00000002")
    assert ckpt["model"]["layers.0.ffn.ffn.w1.weight"].shape == (12, 32)
    # this process imported the plugin already: resume and eval run no code of it again
    rc, _, err = cli("train", "--out", run, "--resume", "--no-progress", "--no-tensorboard")
    assert rc == 0, err
    steps = [r["step"] for r in cli.metrics(run) if "train_loss" in r]
    assert steps == [1, 2, 3, 4]
    assert all(r["aux/toy_l2"] > 0 for r in cli.metrics(run) if "train_loss" in r)
    rc, out, err = cli("eval", run, "--max-batches", "1", "--batch-size", "2", "--device", "cpu")
    assert rc == 0, err
    assert "valid: loss" in out
    rc, out, err = cli("info", "--plugin", PLUGIN, "--preset", "tiny-dense", "ffn=toy")
    assert rc == 0, err
    assert json.loads(out)["model"]["ffn"]["type"] == "toy"


def test_each_auxiliary_loss_is_logged_under_its_name(cli, tmp_path):
    run = tmp_path / "run"
    rc, _, err = cli.train(run, "--max-steps", "2", "entropy_weight=0.01")
    assert rc == 0, err
    records = [r for r in cli.metrics(run) if "train_loss" in r]
    assert records and all("aux/entropy" in r for r in records)
    assert all(r["aux_loss"] == pytest.approx(r["aux/entropy"]) for r in records)
    run = tmp_path / "gshard"
    rc, _, err = cli.train(run, "--max-steps", "2", "n_layers=2", preset="tiny-gshard")
    assert rc == 0, err
    records = [r for r in cli.metrics(run) if "train_loss" in r]
    assert all(r["aux/gshard_balance"] > 0 for r in records)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--plugin", "/no/such/plugin.py"], ["/no/such/plugin.py", "does not exist"]),
        (["--plugin", "no_such_module_xyz"], ["no_such_module_xyz", "cannot be imported"]),
        (["ffn=unregistered"], ["unknown ffn type 'unregistered'", "--plugin"]),
    ],
)
def test_plugin_mistakes_are_one_line_errors(cli, tmp_path, argv, needles):
    rc, _, err = cli.train(tmp_path / "r", "--max-steps", "1", *argv, preset="tiny-dense")
    cli.assert_one_line_error(rc, err, *needles)


def test_a_plugin_that_fails_to_import_names_itself(cli, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    rc, _, err = cli.train(tmp_path / "r", "--max-steps", "1", "--plugin", broken)
    cli.assert_one_line_error(rc, err, str(broken), "boom")
