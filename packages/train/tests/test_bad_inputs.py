"""Bad input, table-driven: every case ends in one `error:` line naming its problem, exit code 2,
no traceback, and no checkpoint of the shared run lost; library calls raise a one-line ValueError
naming theirs.

A CLI case is (argv, words the message must contain); `{run}` is a tiny trained run shared by
every case (its files are compared before and after each case), `{tmp}` a fresh folder,
`{task}` the shipped example task. Most cases fail before any training.
"""

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import moe_data
import moe_kernels
import moe_layers
import moe_models
import pytest
import torch
from moe_train import checkpoint as ckpt

POISON = Path(__file__).with_name("poison_plugin.py")
TINY = ["d_model=32", "n_layers=1", "n_heads=2", "seq_len=16", "d_ff=64"]
QUIET = ["--no-progress", "--no-tensorboard"]


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    from moe_train.cli import main

    run = tmp_path_factory.mktemp("shared") / "run"
    argv = ["train", "--out", str(run), "--max-steps", "4", "--batch-size", "4", *QUIET]
    argv += ["train.save_interval=2", "train.warmup_steps=2", "train.final_eval_batches=2"]
    argv += ["train.eval_batch_size=4", *TINY, "n_experts=4", "expert_size=16"]
    assert main(argv) == 0
    return run


def fingerprint(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


# --- what some cases need on disk ------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def copy_run(run: Path, tmp: Path) -> Path:
    shutil.copytree(run, tmp / "copy")
    return tmp / "copy"


def truncated_copy(run, tmp):
    copy = copy_run(run, tmp)
    for _, folder in ckpt.step_files(copy / "checkpoints"):
        for path in folder.iterdir():
            path.write_bytes(path.read_bytes()[:200])


def forged_checkpoint(run, tmp):
    payload = ckpt.load(run)
    payload["model"] = {k: v[..., :1] for k, v in payload["model"].items()}
    ckpt.write(payload, tmp / "forged")


def model_only_checkpoint(run, tmp):
    payload = ckpt.load(run)
    keep = {k: payload[k] for k in ("run_config", "model", "step")}
    ckpt.CheckpointManager(tmp / "exported" / "checkpoints", keep_last=1).save(keep, step=4)


def live_lock(run, tmp):
    holder = {"pid": os.getpid(), "host": socket.gethostname()}
    write(tmp / "locked" / ".lock", json.dumps(holder))


def foreign_lock(run, tmp):
    write(tmp / "locked" / ".lock", json.dumps({"pid": 1, "host": "another-host.invalid"}))


def a_file(run, tmp):
    write(tmp / "file", "not a folder\n")


def tiny_text(run, tmp):
    write(tmp / "tiny.txt", "abc def\n")


def short_valid(run, tmp):
    folder = tmp / "wt"
    for split, n in (("train", 3000), ("valid", 5), ("test", 5)):
        write(folder / f"wiki.{split}.tokens", " ".join(["the cat sat"] * (n // 3 + 1)) + " \n")


def byte_text(run, tmp):
    write(tmp / "bytes.txt", "some text to read as bytes; " * 200)


def damaged_history(line: bytes):
    """A copy of the run whose metrics.jsonl has `line` in the middle."""

    def setup(run, tmp):
        path = copy_run(run, tmp) / "metrics.jsonl"
        first, rest = path.read_bytes().split(b"\n", 1)
        path.write_bytes(first + b"\n" + line + b"\n" + rest)

    return setup


HISTORY_DAMAGE = [
    (b"[1, 2]", "an array"),
    (b"42", "(42, not an object)"),
    (b'"step"', '("step", not an object)'),
    (b"null", "(null, not an object)"),
    (b'{"step": "3", "train_loss": 1.0}', "'3'"),
    (b'{"step": 1.5, "train_loss": 1.0}', "1.5"),
    (b'{"step": true}', "True"),
    (b'{"step": -1}', "-1"),
    (b'{"train_loss": 1.0}', "None"),
    (b'{"step": 3, "train_loss": 1.0', "not JSON"),
    (b"\xff\xfe garbage", "not UTF-8"),
    (b'{"step": 3, "note": "caf\xe9"}', "not UTF-8"),
]


def moved_corpus(run, tmp):
    """A copy of the run whose corpus (a text file) is gone."""
    copy = copy_run(run, tmp)
    for _, path in ckpt.step_files(copy / "checkpoints"):
        payload = ckpt.load(path, tensors=False)
        payload["run_config"]["data"] = f"text:{tmp}/gone.txt"
        ckpt.atomic_save({k: v for k, v in payload.items() if k != "path"}, path / ckpt.META)


WIDE_PLUGIN = """
import dataclasses
import moe_layers, moe_models
from torch import nn

class Wide(moe_layers.MoEModule):
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(moe_layers.LayerConfig):
        pass

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.w = nn.Linear(self.config.d_model, 2 * self.config.d_model)

    def forward_tokens(self, x_TD, token_ids_T):
        return self.w(x_TD)

moe_models.register_ffn("table_wide", Wide.Config)
"""


def plugin_files(run, tmp):
    write(tmp / "exits.py", "raise SystemExit(0)\n")
    write(tmp / "exits_later.py", "import sys\nsys.exit('bye')\n")
    write(tmp / "wide.py", WIDE_PLUGIN)


def recorded_plugin(run, tmp):
    """A copy of the run whose checkpoints say its layer comes from a plugin nobody named."""
    write(tmp / "unnamed_plugin.py", f"open({str(tmp / 'ran')!r}, 'w').close()\n")
    copy = copy_run(run, tmp)
    for _, path in ckpt.step_files(copy / "checkpoints"):
        payload = ckpt.load(path, tensors=False)
        payload["run_config"]["plugins"] = [str(tmp / "unnamed_plugin.py")]
        payload["run_config"]["model"]["ffn"]["type"] = "unnamed_layer"
        ckpt.atomic_save({k: v for k, v in payload.items() if k != "path"}, path / ckpt.META)


def special_files(run, tmp):
    os.mkfifo(tmp / "fifo.txt")
    (tmp / "zero.txt").symlink_to("/dev/zero")
    (tmp / "dir.txt").mkdir()


def configs(run, tmp):
    write(tmp / "bad.toml", "preset = \n")
    write(tmp / "unknown.json", json.dumps({"optimizer": {}}))
    write(tmp / "typed.json", json.dumps({"train": {"lr": "fast"}}))
    write(tmp / "list.json", json.dumps([1, 2]))


def tasks(run, tmp):
    write(tmp / "label.jsonl", '{"context": "a", "choices": ["b"], "label": 3}\n')
    write(tmp / "empty.jsonl", "")
    write(tmp / "two.jsonl", '{"context": "a", "choices": ["b", "c"], "label": 0}\n' * 2)


CLI_CASES = [
    # train: names, keys and values the config does not have
    (["train", "--preset", "no-such-preset"], ["no-such-preset"]),
    (["train", "--frobnicate"], ["--frobnicate"]),
    (["train", "no_such_field=3"], ["no_such_field"]),
    (["train", "train.no_such_option=3"], ["train.no_such_option"]),
    (["train", "d_model"], ["d_model", "KEY=VALUE"]),
    (["train", "train.max_steps=many"], ["train.max_steps", "many"]),
    (["train", "train.max_steps=1.5"], ["train.max_steps"]),
    (["train", "--max-steps", "1e3"], ["--max-steps", "1e3"]),
    (["train", "train.schedule=wavy"], ["train.schedule", "wavy"]),
    (["train", "--precision", "fp8"], ["--precision", "fp8"]),
    (["train", "train.skip_memory_check=maybe"], ["train.skip_memory_check"]),
    # train: numbers out of range or not finite
    (["train", "--max-steps", "0"], ["train.max_steps", "0"]),
    (["train", "--max-steps", "-5"], ["train.max_steps", "-5"]),
    (["train", "--lr", "inf"], ["train.lr", "inf"]),
    (["train", "--lr", "nan"], ["train.lr", "nan"]),
    (["train", "train.lr=-1e-3"], ["train.lr", "-0.001"]),
    (["train", "train.lr=0"], ["train.lr", "0"]),
    (["train", "train.grad_clip=nan"], ["train.grad_clip", "nan"]),
    (["train", "train.grad_clip=-1"], ["train.grad_clip", "-1"]),
    (["train", "train.min_lr_ratio=5"], ["train.min_lr_ratio", "[0, 1]", "5"]),
    (["train", "train.min_lr_ratio=-0.1"], ["train.min_lr_ratio", "-0.1"]),
    (["train", "train.min_lr_ratio=nan"], ["train.min_lr_ratio", "nan"]),
    (["train", "train.beta1=1"], ["train.beta1", "[0, 1)", "1"]),
    (["train", "train.beta2=1.5"], ["train.beta2", "1.5"]),
    (["train", "train.beta1=-0.1"], ["train.beta1", "-0.1"]),
    (["train", "train.beta2=nan"], ["train.beta2", "nan"]),
    (["train", "train.weight_decay=-0.01"], ["train.weight_decay", "-0.01"]),
    (["train", "train.weight_decay=inf"], ["train.weight_decay", "inf"]),
    (["train", "--warmup-steps", "-1"], ["train.warmup_steps", "-1"]),
    (["train", "--batch-size", "0"], ["train.batch_size", "0"]),
    (["train", "--grad-accum", "0"], ["train.grad_accum", "0"]),
    (["train", "--batch-size", "6", "--grad-accum", "4"], ["train.batch_size=6", "grad_accum"]),
    (["train", "--eval-interval", "0"], ["train.eval_interval", "0"]),
    (["train", "--log-interval", "-2"], ["train.log_interval", "-2"]),
    (["train", "train.save_interval=0"], ["train.save_interval", "0"]),
    (["train", "train.keep_last=0"], ["train.keep_last", "0"]),
    (["train", "train.eval_batches=-1"], ["train.eval_batches", "-1"]),
    (["train", "train.final_eval_batches=-3"], ["train.final_eval_batches", "-3"]),
    (["train", "train.eval_batch_size=0"], ["train.eval_batch_size", "0"]),
    (["train", "train.routing_interval=0"], ["train.routing_interval", "0"]),
    (["train", "--seed", "-1"], ["train.seed", "-1"]),
    (["train", "--seed", str(2**32)], ["train.seed", str(2**32), "4294967295"]),
    (["train", f"train.seed={2**64}"], ["train.seed", str(2**64)]),
    (["train", "--seed", "9" * 40], ["train.seed", "9" * 40]),
    (["generate", "{run}", "--prompt", "a", "--seed", str(2**64)], ["--seed", str(2**64)]),
    (["generate", "{run}", "--prompt", "a", "--seed", "-1"], ["--seed", "-1"]),
    (["prime", "{run}", "--task", "{task}", "--seed", str(2**63)], ["--seed", str(2**63)]),
    (["finetune", "{run}", "--task", "{task}", "--seed", str(2**40)], ["--seed", str(2**40)]),
    (["compare", "tiny-dense", "--seeds", str(10**12), "--plan"], ["seeds", str(10**12)]),
    (["compare", "tiny-dense", "--seeds", "101", "--plan"], ["seeds", "[1, 100]", "101"]),
    (["compare", "tiny-dense", "--seeds", "0,-1", "--plan"], ["seed", "-1"]),
    (["compare", "tiny-dense", "--seeds", f"0,{2**40}", "--plan"], ["seed", str(2**40)]),
    (["compare", "tiny-dense", "--seeds", ",".join(map(str, range(101))), "--plan"], ["101"]),
    (["train", "--stop-at", "0"], ["--stop-at", "0"]),
    # train: the model
    (["train", "--seq-len", "0"], ["seq_len", "0"]),
    (["train", "d_model=0"], ["d_model", "0"]),
    (["train", "dropout=1.5"], ["dropout", "1.5"]),
    (["train", "dropout=nan"], ["dropout", "nan"]),
    (["train", "d_model=32", "n_heads=3"], ["n_heads=3", "d_model=32"]),
    (["train", "n_experts=4", "k=9"], ["k", "9"]),
    (["train", "ffn=unregistered"], ["unregistered", "--plugin"]),
    # train: devices, files, data
    (["train", "--device", "cuda:99"], ["cuda:99"]),
    (["train", "--device", "tpu"], ["tpu"]),
    (["train", "train.precision=fp16", "--device", "cpu"], ["fp16", "CUDA"]),
    (["train", "--data", "text:/nonexistent/corpus.txt"], ["/nonexistent/corpus.txt"]),
    (["train", "--data", "nosuchkind:x"], ["nosuchkind"]),
    (["train", "--data", "text:{tmp}/fifo.txt"], ["fifo.txt", "FIFO"], special_files),
    (["train", "--data", "bytes:{tmp}/fifo.txt"], ["fifo.txt", "FIFO"], special_files),
    (["train", "--data", "bpe:{tmp}/fifo.txt"], ["fifo.txt", "FIFO"], special_files),
    (["train", "--data", "enwik8:{tmp}/fifo.txt"], ["fifo.txt", "FIFO"], special_files),
    (["train", "--data", "text:/dev/zero"], ["/dev/zero", "character device"]),
    (["train", "--data", "bytes:{tmp}/zero.txt"], ["zero.txt", "character device"], special_files),
    (["train", "--data", "text:{tmp}/dir.txt"], ["dir.txt", "folder"], special_files),
    (["train", "--config", "/nonexistent/run.toml"], ["/nonexistent/run.toml"]),
    (["train", "--config", "{tmp}/bad.toml"], ["bad.toml"], configs),
    (["train", "--config", "{tmp}/unknown.json"], ["unknown.json", "optimizer"], configs),
    (["train", "--config", "{tmp}/typed.json"], ["train.lr", "fast"], configs),
    (["train", "--config", "{tmp}/list.json"], ["list.json", "top level"], configs),
    (["train", "--plugin", "/nonexistent/plugin.py"], ["/nonexistent/plugin.py"]),
    (["train", "--plugin", "no_such_module_xyz"], ["no_such_module_xyz"]),
    (["train", "--plugin", "{tmp}/exits.py"], ["exits.py", "SystemExit"], plugin_files),
    (["train", "--plugin", "{tmp}/exits_later.py"], ["exits_later.py", "bye"], plugin_files),
    (
        ["train", "--out", "{tmp}/r", "--plugin", "{tmp}/wide.py", "--preset", "tiny-dense"]
        + ["ffn=table_wide", *TINY, "--max-steps", "2", "--batch-size", "2", *QUIET]
        + ["train.warmup_steps=1", "train.eval_batch_size=2"],
        ["plugin {tmp}/wide.py", "ffn=table_wide", "[..., d_model]"],
        plugin_files,
    ),
    *(
        (argv, ["unnamed_plugin.py", "--plugin", *offer], recorded_plugin)
        for argv, offer in [
            (["eval", "{tmp}/copy"], ["--trust-plugins"]),
            (["generate", "{tmp}/copy", "--prompt", "a"], ["--trust-plugins"]),
            (["prime", "{tmp}/copy", "--task", "{task}"], ["--trust-plugins"]),
            (["finetune", "{tmp}/copy", "--task", "{task}"], ["--trust-plugins"]),
            (["export", "{tmp}/copy", "{tmp}/out"], ["--trust-plugins"]),
            (["train", "--out", "{tmp}/copy", "--resume", "--max-steps", "6"], []),
        ]
    ),
    (["train", "--out", "{tmp}/file", *TINY], ["{tmp}/file", "is a file"], a_file),
    (["train", "--out", "{tmp}/file/run", *TINY], ["{tmp}/file/run", "is a file"], a_file),
    (
        ["train", "--out", "{tmp}/r", "--data", "text:{tmp}/tiny.txt", *TINY],
        ["tiny.txt"],
        tiny_text,
    ),
    (
        ["train", "--out", "{tmp}/r", "--data", "wikitext:{tmp}/wt", *TINY, "--batch-size", "4"],
        ["valid split", "train.eval_batch_size"],
        short_valid,
    ),
    (["train", "--out", "{tmp}/r", "--preset", "artetxe-moe-52b"], ["GiB", "skip_memory_check"]),
    # train: run folders, resuming
    (["train", "--out", "{run}", *TINY], ["{run}", "--resume", "--overwrite"]),
    (["train", "--out", "{run}", "--overwrite", "train.lr=nan"], ["train.lr"]),
    (
        ["train", "--out", "{run}", "--overwrite", "--preset", "artetxe-moe-52b"],
        ["GiB", "skip_memory_check"],
    ),
    (["train", "--resume"], ["--resume", "--out"]),
    (["train", "--out", "{run}", "--resume", "--overwrite"], ["--resume", "--overwrite"]),
    (["train", "--out", "{tmp}/empty", "--resume"], ["no checkpoint"]),
    (["train", "--out", "{run}", "--resume", "d_model=64"], ["--resume", "model"]),
    (["train", "--out", "{run}", "--resume", "--preset", "tiny-gshard"], ["tiny-gshard"]),
    (["train", "--out", "{run}", "--resume", "train.lr=inf"], ["train.lr", "inf"]),
    (["train", "--out", "{tmp}/copy", "--resume"], ["no checkpoint", "loads"], truncated_copy),
    (["train", "--out", "{tmp}/exported", "--resume"], ["not resumed"], model_only_checkpoint),
    *(
        (
            ["train", "--out", "{tmp}/copy", "--resume", "--max-steps", "6"],
            ["metrics.jsonl line 2", why],
            damaged_history(line),
        )
        for line, why in HISTORY_DAMAGE
    ),
    (["train", "--out", "{tmp}/locked", *TINY], ["in use", ".lock", str(os.getpid())], live_lock),
    (["train", "--out", "{tmp}/locked", *TINY], ["another-host.invalid", ".lock"], foreign_lock),
    (
        ["train", "--out", "{tmp}/nan", "--plugin", str(POISON), *TINY, "ffn=poison"]
        + ["ffn.at_call=3", "--max-steps", "6", "--batch-size", "2", *QUIET]
        + ["train.warmup_steps=1", "train.eval_batch_size=2"],
        ["not finite", "step 3"],
    ),
    # eval
    (["eval", "/nonexistent/step-1.pt"], ["/nonexistent/step-1.pt"]),
    (["eval", "{tmp}"], ["no checkpoint", "{tmp}"]),
    (["eval", "{run}", "--batch-size", "0"], ["--batch-size", "0"]),
    (["eval", "{run}", "--batch-size", "x"], ["--batch-size", "x"]),
    (["eval", "{run}", "--max-batches", "-1"], ["--max-batches", "-1"]),
    (["eval", "{run}", "--seq-len", "0"], ["--seq-len", "0"]),
    (["eval", "{run}", "--device", "tpu"], ["tpu"]),
    (["eval", "{run}", "--data", "bytes:{tmp}/bytes.txt"], ["bytes:{tmp}/bytes.txt"], byte_text),
    (["eval", "{tmp}/copy"], ["{tmp}/copy", "corrupt or truncated"], truncated_copy),
    (["eval", "{run}", "--text", "/dev/zero"], ["/dev/zero", "character device"]),
    (["eval", "{tmp}/copy"], ["gone.txt", "does not exist", "--text FILE", "--data"], moved_corpus),
    (["eval", "{run}", "--text", "{tmp}/fifo.txt"], ["fifo.txt", "FIFO"], special_files),
    (["eval", "{run}", "--text", "{tmp}/dir.txt"], ["dir.txt", "folder"], special_files),
    (["eval", "{run}", "--text", "{tmp}/none.txt"], ["none.txt", "does not exist"]),
    (["eval", "{run}", "--data", "text:{tmp}/fifo.txt"], ["fifo.txt", "FIFO"], special_files),
    (["prime", "{run}", "--task", "{tmp}/fifo.txt"], ["fifo.txt", "FIFO"], special_files),
    (["prime", "{run}", "--task", "/dev/zero"], ["/dev/zero", "character device"]),
    (["finetune", "{run}", "--task", "{tmp}/fifo.txt"], ["fifo.txt", "FIFO"], special_files),
    (["eval", "{tmp}/forged", "--max-batches", "1"], ["forged", "shape"], forged_checkpoint),
    # prime
    (["prime", "{run}"], ["--task"]),
    (["prime", "{run}", "--task", "{task}", "--k-shot", "-1"], ["--k-shot", "-1"]),
    (["prime", "{run}", "--task", "{task}", "--max-examples", "-1"], ["--max-examples", "-1"]),
    (["prime", "{run}", "--task", "{task}", "--seed", "-2"], ["--seed", "-2"]),
    (["prime", "{run}", "--task", "{tmp}/two.jsonl", "--k-shot", "2"], ["--k-shot 2"], tasks),
    (["prime", "{run}", "--task", "{tmp}/missing.jsonl"], ["missing.jsonl"]),
    (["prime", "{run}", "--task", "{tmp}/label.jsonl"], ["label.jsonl"], tasks),
    (["prime", "{run}", "--task", "{tmp}/empty.jsonl"], ["empty.jsonl"], tasks),
    (["prime", "/nonexistent/run", "--task", "{task}"], ["/nonexistent/run"]),
    # finetune
    (["finetune", "{run}", "--task", "{task}", "--batch-size", "0"], ["--batch-size", "0"]),
    (
        ["finetune", "{run}", "--task", "{task}", "--out", "{tmp}/locked"],
        ["in use", ".lock", str(os.getpid())],
        live_lock,
    ),
    (
        ["finetune", "{run}", "--task", "{task}", "--out", "{tmp}/locked"],
        ["another-host.invalid", ".lock"],
        foreign_lock,
    ),
    (["finetune", "{run}", "--task", "{task}", "--max-steps", "0"], ["--max-steps", "0"]),
    (["finetune", "{run}", "--task", "{task}", "--lr", "nan"], ["--lr", "nan"]),
    (["finetune", "{run}", "--task", "{task}", "--lr", "-1"], ["--lr", "-1"]),
    (["finetune", "{run}", "--task", "{task}", "--k-shot", "-3"], ["--k-shot", "-3"]),
    (["finetune", "{run}", "--task", "{tmp}/label.jsonl"], ["label.jsonl"], tasks),
    (
        ["finetune", "{run}", "--task", "{task}", "--eval-task", "{tmp}/missing.jsonl"],
        ["missing.jsonl"],
    ),
    # info
    (["info", "--preset", "nope"], ["nope"]),
    (["info", "d_model=0"], ["d_model", "0"]),
    (["info", "train.lr=nan"], ["train.lr", "nan"]),
    (["info", "train.beta2=1"], ["train.beta2", "1"]),
    (["info", "--config", "/nonexistent/run.json"], ["/nonexistent/run.json"]),
    (["info", "seq_len"], ["seq_len", "KEY=VALUE"]),
    # the command itself
    (["frobnicate"], ["frobnicate"]),
]


def _id(case) -> str:
    return " ".join(case[0])[:80] or "(no arguments)"


@pytest.mark.parametrize("case", CLI_CASES, ids=[_id(c) for c in CLI_CASES])
def test_cli_bad_input_is_one_line_exit_2_and_loses_no_checkpoint(cli, shared_run, tmp_path, case):
    argv, needles, *setup = case
    for prepare in setup:
        prepare(shared_run, tmp_path)
    context = {"run": shared_run, "tmp": tmp_path, "task": moe_data.example_task_path()}
    before = fingerprint(shared_run)
    rc, _, err = cli(*(a.format(**context) for a in argv))
    assert rc == 2, err
    assert "Traceback" not in err, err
    *notes, line = err.strip().splitlines()
    # what was skipped or taken over may be said before, as notes
    assert all(n.startswith("note: ") for n in notes), err
    assert line.startswith("error: "), err
    for needle in needles:
        assert needle.format(**context) in line, (needle, line)
    assert fingerprint(shared_run) == before


def test_a_torn_last_history_line_is_dropped_with_a_note(cli, shared_run, tmp_path):
    """What a crash or a full disk during an append leaves: the last line without its newline.
    The resumed run drops it, says so, and logs its steps again."""
    copy = copy_run(shared_run, tmp_path)
    path = copy / "metrics.jsonl"
    path.write_bytes(path.read_bytes() + b'{"step": 5, "train_lo')
    rc, _, err = cli("train", "--out", copy, "--resume", "--max-steps", "6", *QUIET)
    assert rc == 0, err
    assert "metrics.jsonl ends in an incomplete line" in err
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(isinstance(r["step"], int) for r in records) and records[-1]["step"] == 6


EVIL = """
import os, sys, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"format": "moe-train checkpoint", "model": Evil()}, sys.argv[1])
"""


@pytest.mark.parametrize("command", ["eval", "generate", "export", "prime", "resume"])
def test_a_malicious_checkpoint_is_refused_without_advice_to_load_it(cli, tmp_path, command):
    import subprocess
    import sys

    evil, marker = tmp_path / "run" / "checkpoints" / "step-00000001", tmp_path / "pwned"
    evil.mkdir(parents=True)
    subprocess.run([sys.executable, "-c", EVIL, str(evil / ckpt.META), str(marker)], check=True)
    argv = {
        "eval": ["eval", evil],
        "generate": ["generate", evil, "--prompt", "a"],
        "export": ["export", evil, tmp_path / "out"],
        "prime": ["prime", evil, "--task", moe_data.example_task_path()],
        "resume": ["train", "--out", tmp_path / "run", "--resume"],
    }[command]
    rc, _, err = cli(*argv)
    assert rc == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert "refused" in line and "system" in line, line
    assert "weights_only" not in err and "will likely succeed" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_failed_export_leaves_no_folder_behind(cli, shared_run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "moe_models.hf", None)  # transformers not installed
    rc, _, err = cli("export", shared_run, tmp_path / "hf", "--format", "hf")
    assert rc == 2 and "--all-packages --extra hf" in err and "moe-train[hf]" in err, err
    assert not (tmp_path / "hf").exists()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(moe_data, "save_tokenizer", full_disk)
    for out in (tmp_path / "new", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        rc, _, err = cli("export", shared_run, out)
        assert rc == 2 and "No space left" in err, err
        assert (out.exists() and not any(out.iterdir())) == (out.name == "empty")


def test_the_files_of_an_export_and_a_run_share_one_mode(cli, shared_run, tmp_path):
    rc, _, err = cli("export", shared_run, tmp_path / "out")
    assert rc == 0, err
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert len(set(modes.values())) == 1, modes
    run_modes = {p.name: p.stat().st_mode & 0o777 for p in shared_run.rglob("*") if p.is_file()}
    assert len(set(run_modes.values())) == 1, run_modes


def test_eval_into_a_read_only_place_fails_before_evaluating(cli, shared_run, monkeypatch):
    from moe_train import evaluate

    ran = []
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: ran.append(1) or 1.0)
    real_access = os.access

    def read_only_run(path, mode):
        inside = Path(path) == shared_run or shared_run in Path(path).parents
        return False if inside and mode & os.W_OK else real_access(path, mode)

    monkeypatch.setattr(os, "access", read_only_run)
    rc, _, err = cli("eval", shared_run, "--max-batches", "1")
    assert rc == 2 and "not writable" in err and "--out FILE" in err, err
    assert len(err.strip().splitlines()) == 1 and not ran


def _wide(x):
    return moe_layers.SigmaMoE(16, 4, 8, 2)(x)


x_TD = torch.randn(6, 16)
w1_EDG, w2_EGD = torch.randn(4, 16, 8), torch.randn(4, 8, 16)
idx_TK = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
gates_TK = torch.full((6, 2), 0.5)
out_of_range_TK = idx_TK.clone().index_fill_(0, torch.tensor([4]), 4)
negative_TK = idx_TK.clone().index_fill_(0, torch.tensor([2]), -1)
tokens_BL = torch.zeros(2, 8, dtype=torch.long)

LIBRARY_CASES = [
    (
        "SigmaMoE input of the wrong width",
        lambda: _wide(torch.randn(4, 8)),
        ["d_model=16", "(4, 8)"],
    ),
    ("SigmaMoE k > n_experts", lambda: moe_layers.SigmaMoE(16, 4, 8, 5), ["k", "5"]),
    ("SigmaMoE no experts", lambda: moe_layers.SigmaMoE(16, 0, 8, 2), ["n_experts", "0"]),
    (
        "SigmaMoE expert_dropout 1.5",
        lambda: moe_layers.SigmaMoE(16, 4, 8, 2, expert_dropout=1.5),
        ["expert_dropout", "1.5"],
    ),
    (
        "SwitchMoE token_ids of another shape",
        lambda: moe_layers.SwitchMoE(16, 4, 8)(x_TD, token_ids=torch.zeros(3, dtype=torch.long)),
        ["token_ids", "(3,)"],
    ),
    ("DenseFFN d_ff 0", lambda: moe_layers.DenseFFN(16, 0), ["d_ff", "0"]),
    ("PKM n_keys 0", lambda: moe_layers.PKM(16, n_keys=0), ["n_keys", "0"]),
    ("TopKFFN k > d_ff", lambda: moe_layers.TopKFFN(16, 32, k=64), ["k", "64"]),
    (
        "GShardMoE negative capacity",
        lambda: moe_layers.GShardMoE(16, 4, 8, capacity_factor=-1.0),
        ["capacity_factor", "-1"],
    ),
    (
        "expert_mlp ids >= n_experts",
        lambda: moe_kernels.expert_mlp(x_TD, w1_EDG, w2_EGD, out_of_range_TK, gates_TK),
        ["idx", "[0, 4)"],
    ),
    (
        "expert_mlp negative ids",
        lambda: moe_kernels.expert_mlp(x_TD, w1_EDG, w2_EGD, negative_TK, gates_TK),
        ["idx", "-1"],
    ),
    (
        "expert_mlp gates of another shape",
        lambda: moe_kernels.expert_mlp(x_TD, w1_EDG, w2_EGD, idx_TK, gates_TK[:, :1]),
        ["gates", "(6, 1)"],
    ),
    (
        "expert_mlp unknown activation",
        lambda: moe_kernels.expert_mlp(x_TD, w1_EDG, w2_EGD, idx_TK, gates_TK, activation="tanh"),
        ["activation", "tanh"],
    ),
    (
        "expert_mlp w2 not [E, G, D]",
        lambda: moe_kernels.expert_mlp(x_TD, w1_EDG, w1_EDG, idx_TK, gates_TK),
        ["w2", "(4, 16, 8)"],
    ),
    (
        "expert_matmul float ids",
        lambda: moe_kernels.expert_matmul(x_TD, w1_EDG, idx_TK.float()),
        ["idx", "integer"],
    ),
    (
        "expert_matmul x of the wrong width",
        lambda: moe_kernels.expert_matmul(x_TD[:, :3], w1_EDG, idx_TK),
        ["x", "(6, 3)"],
    ),
    (
        "expert_matmul dtypes differ",
        lambda: moe_kernels.expert_matmul(x_TD.double(), w1_EDG, idx_TK),
        ["dtype", "float64"],
    ),
    (
        "expert_matmul unknown backend",
        lambda: moe_kernels.expert_matmul(x_TD, w1_EDG, idx_TK, backend="cuda"),
        ["backend", "cuda"],
    ),
    (
        "expert_matmul ids out of range",
        lambda: moe_kernels.expert_matmul(x_TD, w1_EDG, out_of_range_TK),
        ["idx", "[0, 4)"],
    ),
    (
        "sort_by_expert ids out of range",
        lambda: moe_kernels.sort_by_expert(out_of_range_TK, 4),
        ["idx", "[0, 4)"],
    ),
    ("sort_by_expert no experts", lambda: moe_kernels.sort_by_expert(idx_TK, 0), ["n_experts"]),
    (
        "model tokens >= vocab_size",
        lambda: moe_models.build("tiny-sigma-moe")(torch.full((1, 4), 10**6)),
        ["vocab_size=256", "1000000"],
    ),
    (
        "model float tokens",
        lambda: moe_models.build("tiny-sigma-moe")(torch.zeros(1, 4)),
        ["tokens", "float32"],
    ),
    (
        "model targets of another shape",
        lambda: moe_models.build("tiny-dense")(tokens_BL, tokens_BL[:, :4]),
        ["targets", "(2, 4)"],
    ),
    ("get_config unknown preset", lambda: moe_models.get_config("nope"), ["nope"]),
    (
        "get_config d_model 0",
        lambda: moe_models.get_config("tiny-sigma-moe", d_model=0),
        ["d_model", "0"],
    ),
    (
        "XLBatcher batch 0",
        lambda: moe_data.XLBatcher(list(range(100)), 0, 8),
        ["batch_size", "0"],
    ),
    ("moe_data.load unknown kind", lambda: moe_data.load("nosuchkind:x"), ["nosuchkind"]),
]


@pytest.mark.parametrize("name, call, needles", LIBRARY_CASES, ids=[c[0] for c in LIBRARY_CASES])
def test_library_bad_input_is_a_one_line_value_error(name, call, needles):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message.strip(), message
    for needle in needles:
        assert needle in message, (needle, message)


def test_the_table_holds_at_least_sixty_bad_inputs():
    assert len(CLI_CASES) + len(LIBRARY_CASES) >= 60


def test_info_list_into_a_closed_pipe_is_quiet():
    """`moe-train info --list | head -1`: the reader leaves early; that is no error."""
    import subprocess
    import sys

    listing = subprocess.Popen(
        [sys.executable, "-m", "moe_train.cli", "info", "--list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert listing.stdout.readline().startswith(b"preset")
    listing.stdout.close()
    _, err = listing.communicate(timeout=120)
    assert listing.returncode == 0, err
    assert err == b"", err


@pytest.mark.parametrize(
    "command, flag, words",
    [
        ("generate", "--max-new-tokens", ["tokens to generate"]),
        ("generate", "--temperature", ["logits", "--greedy"]),
        ("generate", "--device", ["cpu", "cuda", "auto"]),
        ("export", "--format", ["plain", "hf", "load_pretrained", "AutoModelForCausalLM"]),
        ("info", "[PRESET] KEY=VALUE", ["d_model=256", "train.lr"]),
        ("eval", "--text", ["regular file", "256 MiB"]),
    ],
)
def test_every_option_in_help_says_what_it_does(capsys, command, flag, words):
    from moe_train.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    usage_end = text.index("arguments:") if "arguments:" in text else text.index("options:")
    at = text.index(flag, usage_end)
    described = text[at : at + 400]
    for word in words:
        assert word in described, (flag, word, described)
