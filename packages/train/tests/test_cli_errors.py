"""Every kind of bad input is one `error: ...` line on stderr and exit code 2, never a traceback."""

import shutil

import pytest
import torch
from moe_train import checkpoint as ckpt


@pytest.fixture(scope="module")
def gshard_run(tmp_path_factory):
    from moe_train.cli import main

    run = tmp_path_factory.mktemp("gshard") / "run"
    argv = [
        "train",
        "--preset",
        "tiny-gshard",
        "--out",
        str(run),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--no-progress",
        "--no-tensorboard",
        "train.final_eval_batches=1",
        "train.eval_batch_size=2",
        "d_model=32",
        "n_heads=2",
        "n_layers=2",
        "seq_len=16",
        "d_ff=32",
        "n_experts=2",
        "expert_size=16",
    ]
    assert main(argv) == 0
    return run


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["train", "--preset", "no-such-preset"], ["no-such-preset"]),
        (["train", "--frobnicate"], ["--frobnicate"]),
        (["train", "no_such_field=3"], ["no_such_field"]),
        (["train", "train.no_such_option=3"], ["train.no_such_option"]),
        (["train", "train.max_steps=many"], ["train.max_steps"]),
        (["train", "--max-steps", "0"], ["max_steps"]),
        (["train", "--data", "text:/nonexistent/corpus.txt"], ["/nonexistent/corpus.txt"]),
        (["train", "--data", "nosuchkind:x"], ["nosuchkind"]),
        (["train", "--device", "cuda:99"], ["cuda:99"]),
        (["train", "--device", "tpu"], ["tpu"]),
        (["train", "--config", "/nonexistent/run.toml"], ["/nonexistent/run.toml"]),
        (["eval", "/nonexistent/step-1.pt"], ["/nonexistent/step-1.pt"]),
        (["info", "--preset", "nope"], ["nope"]),
        (["frobnicate"], ["frobnicate"]),
    ],
)
def test_bad_arguments(cli, argv, needles):
    rc, _, err = cli(*argv)
    assert rc == 2
    cli.assert_one_line_error(rc, err, *needles)


def test_cuda_device_when_there_is_none(cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; cuda:99 above covers a missing device")
    rc, _, err = cli.train(tmp_path / "r", "--device", "cuda")
    cli.assert_one_line_error(rc, err, "CUDA")


def test_corrupt_data_file(cli, tmp_path):
    bad = tmp_path / "corpus.txt"
    bad.write_bytes(b"some text \xff\xfe\x00 not utf-8" * 50)
    rc, _, err = cli.train(tmp_path / "r", "--data", f"text:{bad}")
    cli.assert_one_line_error(rc, err, str(bad))


def test_resume_with_another_architecture_names_the_checkpoint(cli, gshard_run):
    rc, _, err = cli("train", "--preset", "tiny-sigma-moe", "--out", gshard_run, "--resume")
    cli.assert_one_line_error(rc, err, "step-00000002", "decoder", "transformer_xl")


def test_checkpoint_whose_weights_do_not_fit_its_config(cli, gshard_run, tmp_path):
    payload = ckpt.load(gshard_run)
    payload["run_config"]["model"]["arch"] = "transformer_xl"
    forged = ckpt.write(payload, tmp_path / "forged")
    rc, _, err = cli("eval", forged, "--max-batches", "1")
    cli.assert_one_line_error(rc, err, str(forged))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_checkpoint_names_the_file(cli, gshard_run, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt.latest(gshard_run), bad)
    for path in bad.iterdir():
        source = path.read_bytes()
        path.write_bytes(source[: len(source) // 3] if damage == "truncated" else b"\x00bad" * 9)
    for command in ("eval", "prime"):
        extra = ["--task", "x.jsonl"] if command == "prime" else []
        rc, _, err = cli(command, bad, *extra)
        cli.assert_one_line_error(rc, err, str(bad))


def test_corrupt_latest_checkpoint_on_resume(cli, gshard_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(gshard_run, run)
    latest = ckpt.latest(run)
    meta = latest / ckpt.META
    meta.write_bytes(meta.read_bytes()[:100])
    rc, _, err = cli("train", "--out", run, "--resume")
    cli.assert_one_line_error(rc, err, str(latest))


def test_finetuned_checkpoint_cannot_be_resumed(cli, gshard_run, tmp_path):
    payload = ckpt.load(gshard_run)
    run = tmp_path / "exported"
    keep = {k: payload[k] for k in ("run_config", "model", "step")}
    ckpt.CheckpointManager(run / "checkpoints", keep_last=1).save(keep, step=2)
    rc, _, err = cli("train", "--out", run, "--resume")
    cli.assert_one_line_error(rc, err, "not resumed")


def test_bad_task_file(cli, gshard_run, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text('{"context": "a", "choices": ["b"], "label": 3}\n')
    rc, _, err = cli("prime", gshard_run, "--task", task)
    cli.assert_one_line_error(rc, err, str(task))
    rc, _, err = cli("prime", gshard_run, "--task", tmp_path / "missing.jsonl")
    cli.assert_one_line_error(rc, err, "missing.jsonl")
