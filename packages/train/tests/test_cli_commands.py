"""End-to-end `moe-train eval`, `prime`, `finetune` and `info`, on a tiny trained run."""

import json
import math

import moe_data
import moe_models
import pytest
import torch
from moe_train import checkpoint as ckpt
from moe_train.priming import IGNORE, choice_scores, sequence


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from moe_train.cli import main

    run = tmp_path_factory.mktemp("trained") / "run"
    argv = [
        "train",
        "--out",
        str(run),
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--no-progress",
        "--no-tensorboard",
        "train.final_eval_batches=2",
        "train.eval_batch_size=4",
        "d_model=32",
        "n_layers=1",
        "n_heads=2",
        "seq_len=32",
        "d_ff=64",
        "n_experts=4",
        "expert_size=16",
    ]
    assert main(argv) == 0
    return run


def test_eval_prints_and_writes_valid_and_test_metrics(cli, run_dir, tmp_path):
    out = tmp_path / "eval.json"
    rc, stdout, err = cli("eval", run_dir, "--max-batches", "2", "--batch-size", "4", "--out", out)
    assert rc == 0, err
    record = json.loads(out.read_text())
    assert record["step"] == 4 and record["checkpoint"].endswith("step-00000004")
    for split in ("valid", "test"):
        assert record[f"{split}_bpc"] == pytest.approx(record[f"{split}_loss"] / math.log(2))
        assert f"{split}: loss" in stdout


def test_eval_with_memory_matches_the_training_time_final_evaluation(cli, run_dir, tmp_path):
    final = [r for r in cli.metrics(run_dir) if r.get("final")][0]
    out = tmp_path / "eval.json"
    rc, _, err = cli(
        "eval",
        run_dir / "checkpoints" / "best",
        "--max-batches",
        "2",
        "--batch-size",
        "4",
        "--out",
        out,
    )
    assert rc == 0, err
    assert json.loads(out.read_text())["valid_loss"] == pytest.approx(final["valid_loss"], rel=1e-5)


def test_prime_zero_and_few_shot(cli, run_dir):
    task = moe_data.example_task_path()
    for k in (0, 2):
        rc, stdout, err = cli("prime", run_dir, "--task", task, "--k-shot", k, "--max-examples", 6)
        assert rc == 0, err
        result = json.loads(stdout)
        assert result["n"] == 6 and result["k_shot"] == k
        assert round(result["accuracy"] * 6) == pytest.approx(result["accuracy"] * 6)


def test_finetune_learns_a_task_and_writes_a_checkpoint(cli, run_dir, tmp_path):
    # the right answer is always " yes", in either position: learnable in a few steps
    lines = [json.dumps({"name": "yes", "separator": "\n"})]
    for i in range(8):
        choices = [" yes", " no"] if i % 2 else [" no", " yes"]
        lines.append(
            json.dumps(
                {"context": f"is {i} ok?", "choices": choices, "label": choices.index(" yes")}
            )
        )
    task = tmp_path / "yes.jsonl"
    task.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ft"
    rc, stdout, err = cli(
        "finetune", run_dir, "--task", task, "--max-steps", 40, "--lr", 3e-3, "--out", out
    )
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["accuracy"] == 1.0 and result["n"] == 8
    saved = json.loads((out / "finetune.json").read_text())
    assert {k: saved[k] for k in result} == result
    assert saved["options"]["max_steps"] == 40 and saved["options"]["lr"] == 3e-3
    steps = [r["step"] for r in cli.metrics(out) if "train_loss" in r]
    assert steps == list(range(5, 45))
    assert json.loads((out / "config.json").read_text())["model"]["d_model"] == 32
    assert ckpt.load(out)["step"] == 4 + 40


def test_choice_scores_do_not_depend_on_padding(run_dir):
    payload = ckpt.load(run_dir)
    from moe_train.config import RunConfig

    cfg = RunConfig.from_dict(payload["run_config"])
    model = moe_models.build(cfg.model)
    model.load_state_dict(payload["model"])
    model.eval()
    corpus = moe_data.load(cfg.data)
    prefix = [int(i) for i in corpus.encode("And God said")]
    pairs = [
        sequence(prefix, [int(i) for i in corpus.encode(c)], 32) for c in (" go", " let there be")
    ]
    together = choice_scores(model, pairs, "cpu")
    for (inputs, targets), score in zip(pairs, together, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inputs])).logits[0].float(), -1)
        mask = torch.tensor(targets) != IGNORE
        expected = logp[mask].gather(-1, torch.tensor(targets)[mask][:, None]).sum()
        assert score == pytest.approx(float(expected), rel=1e-5, abs=1e-5)


def test_sequence_truncates_the_prefix_from_the_left_and_masks_it():
    inputs, targets = sequence([1, 2, 3, 4, 5], [6, 7], max_len=4)
    assert inputs == [3, 4, 5, 6] and targets == [IGNORE, IGNORE, 6, 7]


def test_info_prints_config_counts_and_flops(cli):
    rc, stdout, err = cli("info", "--preset", "tiny-dense", "d_model=64")
    assert rc == 0, err
    info = json.loads(stdout)
    cfg = moe_models.get_config("tiny-dense", d_model=64)
    assert info["model"]["d_model"] == 64 and info["preset"] == "tiny-dense"
    assert info["parameters"] == moe_models.count_parameters(cfg)
    assert info["flops_per_token"] == moe_models.flops_per_token(cfg)
    rc, stdout, _ = cli("info", "--list")
    assert rc == 0
    header, *rows = stdout.splitlines()
    assert header.split()[:3] == ["preset", "params", "active"]
    assert [r.split()[0] for r in rows] == moe_models.presets()
    for row in rows:
        name, total = row.split()[:2]
        assert moe_models.preset_info(name).description in row
        counted = moe_models.count_parameters(moe_models.get_config(name))["total"]
        assert total == f"{counted / 1e6:.1f}M" or total.endswith(("B", "k"))
