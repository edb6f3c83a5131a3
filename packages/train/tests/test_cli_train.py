"""End-to-end `moe-train train`: outputs of a run, resume equivalence, routing statistics."""

import json
import math
import shutil

import pytest
from moe_train import checkpoint as ckpt


def test_train_writes_config_metrics_and_checkpoints(cli, tmp_path):
    run = tmp_path / "run"
    rc, out, err = cli.train(
        run, "--max-steps", "6", "train.routing_interval=3", "train.keep_last=1"
    )
    assert rc == 0, err
    assert "validation bpc" in out and str(run) in out
    saved = json.loads((run / "config.json").read_text())
    assert saved["preset"] == "tiny-sigma-moe" and saved["model"]["d_model"] == 32
    assert saved["train"]["max_steps"] == 6 and saved["train"]["batch_size"] == 4
    records = cli.metrics(run)
    assert sorted(cli.losses(run)) == list(range(1, 7))
    assert all(
        math.isfinite(r["train_loss"]) and r["train_bpc"] > 0 for r in records if "train_loss" in r
    )
    final = [r for r in records if r.get("final")]
    assert len(final) == 1 and final[0]["valid_bpc"] == pytest.approx(
        final[0]["valid_loss"] / math.log(2)
    )
    routing = [r["routing"] for r in records if "routing" in r]
    assert len(routing) == 2
    layer = next(iter(routing[0].values()))
    assert len(layer["usage"]) == 4 and sum(layer["usage"]) == pytest.approx(1.0, abs=1e-4)
    assert 0.0 <= layer["entropy"] <= math.log(4) + 1e-6 and layer["n_tokens"] > 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best", "step-00000006"]


@pytest.mark.parametrize("preset, extra", [("tiny-sigma-moe", []), ("tiny-gshard", ["n_layers=2"])])
def test_interrupted_and_resumed_run_gives_the_same_losses(cli, tmp_path, preset, extra):
    # dropout on, so the RNG state must be restored too; grad accumulation over two micro-batches
    common = [
        "--max-steps",
        "8",
        "dropout=0.1",
        "--grad-accum",
        "2",
        "train.save_interval=3",
        *extra,
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli.train(straight, *common, preset=preset)[0] == 0
    rc, out, err = cli.train(split, *common, "--stop-at", "5", preset=preset)
    assert rc == 0, err
    assert "--resume" in out
    assert max(cli.losses(split)) == 5
    rc, _, err = cli("train", "--out", split, "--resume", "--no-progress", "--no-tensorboard")
    assert rc == 0, err
    assert cli.losses(split) == cli.losses(straight)


def test_resume_after_a_crash_past_the_last_checkpoint_drops_the_unsaved_log_lines(cli, tmp_path):
    run = tmp_path / "run"
    assert cli.train(run, "--max-steps", "6", "--stop-at", "4", "train.save_interval=2")[0] == 0
    # the process died at step 4 just before writing that checkpoint
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    assert ckpt.latest(run).name == "step-00000002"
    rc, _, err = cli("train", "--out", run, "--resume", "--no-progress", "--no-tensorboard")
    assert rc == 0, err
    steps = [r["step"] for r in cli.metrics(run) if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_may_extend_max_steps_but_not_change_the_model(cli, tmp_path):
    run = tmp_path / "run"
    assert cli.train(run, "--max-steps", "3")[0] == 0
    rc, _, err = cli(
        "train", "--out", run, "--resume", "--max-steps", "5", "--no-progress", "--no-tensorboard"
    )
    assert rc == 0, err
    assert max(cli.losses(run)) == 5
    rc, _, err = cli("train", "--out", run, "--resume", "d_model=64")
    assert rc == 2 and "model" in err


def test_a_new_run_refuses_to_overwrite_an_existing_one(cli, tmp_path):
    run = tmp_path / "run"
    assert cli.train(run, "--max-steps", "2")[0] == 0
    rc, _, err = cli.train(run, "--max-steps", "2")
    assert rc == 2 and "--resume" in err


def test_linear_schedule_and_bf16_autocast_on_cpu(cli, tmp_path):
    run = tmp_path / "run"
    argv = ["--max-steps", "4", "--precision", "bf16", "train.schedule=linear"]
    rc, _, err = cli.train(run, *argv, preset="tiny-sigma-moe")
    assert rc == 0, err
    records = [r for r in cli.metrics(run) if "lr" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["train_loss"]) for r in records)
    # 2 warmup steps, then linear decay towards 10% of the peak at step 4 (halfway at step 3)
    peak = json.loads((run / "config.json").read_text())["train"]["lr"]
    assert [r["lr"] for r in records] == pytest.approx([0.5 * peak, peak, peak, 0.55 * peak])


def test_tensorboard_event_files_are_written(cli, tmp_path):
    run = tmp_path / "run"
    rc, _, err = cli(
        "train",
        "--out",
        run,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--no-progress",
        "train.final_eval_batches=1",
        "train.eval_batch_size=4",
        *cli.TINY_MODEL,
    )
    assert rc == 0, err
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_word_level_data_reports_perplexity(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_DATA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "wikitext"
    folder.mkdir()
    words = "the cat sat on a mat and the dog ran to the cat".split()
    for split, n in (("train", 400), ("valid", 80), ("test", 80)):
        lines = [
            " ".join(words[(i + j) % len(words)] for j in range(12)) for i in range(n // 12 + 1)
        ]
        (folder / f"wiki.{split}.tokens").write_text(" \n".join(lines) + " \n")
    run = tmp_path / "run"
    rc, out, err = cli.train(run, "--max-steps", "3", "--data", f"wikitext:{folder}")
    assert rc == 0, err
    assert "validation perplexity" in out
    final = [r for r in cli.metrics(run) if r.get("final")][0]
    assert final["valid_ppl"] == pytest.approx(math.exp(final["valid_loss"]))
    assert "valid_bpc" not in final and "train_ppl" in cli.metrics(run)[0]
