"""Every flag of every subcommand reaches what the command does.

The test walks `moe_train.cli.build_parser()`: for each optional flag of each subcommand it runs
the command once with a baseline command line and once with that flag set to a value other than
its default, and compares what the command did: the arguments of the calls it makes into the
library (spied, most of them run for real on a tiny trained run; training and `compare.run` are
recorded without running), its exit code, its stdout and the files it wrote. A flag that changes
none of these is not wired, and the test fails naming it; so does a subcommand (or a flag whose
value cannot be guessed from its type) that this file has no baseline for.
"""

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import moe_data
import moe_models
import pytest
import torch
from moe_train import cli as cli_module

TOY_PLUGIN = Path(__file__).with_name("toy_plugin.py")
SKIPPED_COMMANDS = {"lm-eval"}  # hands its whole command line to lm-evaluation-harness


@pytest.fixture(scope="module")
def wired_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("wiring") / "run"
    argv = ["train", "--out", str(run), "--max-steps", "2", "--batch-size", "2"]
    argv += ["--no-progress", "--no-tensorboard", "train.warmup_steps=1"]
    argv += ["train.final_eval_batches=1", "train.eval_batch_size=2"]
    argv += ["d_model=32", "n_layers=1", "n_heads=2", "seq_len=16", "d_ff=64"]
    argv += ["n_experts=4", "expert_size=16"]
    assert cli_module.main(argv) == 0
    return run


@pytest.fixture(scope="module")
def files(tmp_path_factory, wired_run):
    d = tmp_path_factory.mktemp("wiring-files")
    task = d / "task.jsonl"
    lines = [
        json.dumps({"context": f"is {i} ok?", "choices": [" yes", " no"], "label": i % 2})
        for i in range(6)
    ]
    task.write_text("\n".join(lines) + "\n")
    config = d / "run.json"
    config.write_text(json.dumps({"train": {"seed": 5}}))
    text = d / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 20)
    sweep = d / "sweep.toml"
    sweep.write_text('[[runs]]\npreset = "tiny-dense"\n')
    return {"task": task, "config": config, "text": text, "sweep": sweep, "out": d / "out"}


def baselines(run: Path, f: dict) -> dict[str, list[str]]:
    """A command line per subcommand that works, cheaply, and that each flag is added to."""
    quick = ["--max-examples", "2"]
    return {
        "train": ["train", "--out", str(run)],
        "eval": ["eval", str(run), "--max-batches", "1", "--batch-size", "2"],
        "prime": ["prime", str(run), "--task", str(f["task"]), *quick],
        "finetune": ["finetune", str(run), "--task", str(f["task"]), "--max-steps", "1", *quick]
        + ["--batch-size", "2", "--out", str(f["out"])],
        "generate": ["generate", str(run), "--prompt", "In the", "--max-new-tokens", "4"],
        "export": ["export", str(run), str(f["out"])],
        "compare": ["compare", "tiny-dense", "--out", str(f["out"])],
        "info": ["info"],
    }


def sentinels(command: str, run: Path, f: dict) -> dict[str, list[str]]:
    """Values for flags whose type says nothing about what a valid one is."""
    common = {
        "plugin": [str(TOY_PLUGIN)],
        "device": ["cpu"],
        "out": [str(f["out"].with_name("elsewhere"))],
        "config": [str(f["config"])],
        "task": [str(moe_data.example_task_path())],
        "eval_task": [str(moe_data.example_task_path())],
        "text": [str(f["text"])],
        "prompt": ["And God said"],
        "sweep": [str(f["sweep"])],
        "seeds": ["0,3"],
        "preset": ["tiny-dense"],
        # unset (None) means fp32
        "precision": ["bf16"],
        "twins": ["params"],
        # the run's own corpus, named: the spec reaches the loader, the vocabulary stays
        "data": ["default"] if command != "train" else ["text:elsewhere.txt"],
    }
    if command == "compare":
        common["task"] = ["default"]
    return common


def value_for(action: argparse.Action, command: str, run: Path, f: dict) -> list[str] | None:
    """The arguments that set `action` to something other than its default (None: unknown)."""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreConstAction):
        return []
    special = sentinels(command, run, f)
    if action.dest in special:
        return special[action.dest]
    if action.choices:
        return [next(str(c) for c in action.choices if c != action.default)]
    kind = getattr(action.type, "__name__", "")
    if action.type is int or kind in ("positive_int", "non_negative_int", "seed_int"):
        return ["3" if action.default != 3 else "5"]
    if action.type is float or kind in ("positive_float", "top_p"):
        return ["0.5" if action.default != 0.5 else "0.25"]
    return None


def plain(obj):
    """A comparable form of what a spied call received."""
    if isinstance(obj, torch.nn.Module):
        return type(obj).__name__
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), float(obj.double().sum()))
    if hasattr(obj, "__array__") and hasattr(obj, "shape"):
        return ("array", tuple(obj.shape), float(obj.sum()))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "to_dict"):
        return plain(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, str | int | float | bool | type(None)):
        return obj
    if isinstance(obj, Path | torch.device):
        return str(obj)
    if isinstance(obj, torch.Generator):
        return ("generator", obj.initial_seed())
    # a vocabulary, a callback, ...: its kind (its repr may hold an address)
    return type(obj).__name__


class Spy:
    """Records the calls of the library functions the commands reach, by name."""

    def __init__(self, monkeypatch):
        self.calls: list = []
        self.monkeypatch = monkeypatch

    def watch(self, target: str, fake=None):
        module_name, _, name = target.rpartition(".")
        module = __import__(module_name, fromlist=[name])
        real = getattr(module, name)

        def spy(*args, **kwargs):
            self.calls.append((target, plain(args), plain(kwargs)))
            return (fake or real)(*args, **kwargs)

        self.monkeypatch.setattr(module, name, spy)


def fake_train(cfg, opts):
    from moe_train.trainer import TrainResult

    return TrainResult(Path(opts.out_dir or "runs/x"), cfg.train.max_steps, "char", 1.0, False)


def spies(monkeypatch) -> Spy:
    spy = Spy(monkeypatch)
    spy.watch("moe_train.trainer.train", fake=fake_train)
    spy.watch("moe_train.compare.run", fake=lambda *a, **k: True)
    spy.watch("moe_train.data.load_corpus")
    spy.watch("moe_train.evaluate.evaluate")
    spy.watch("moe_train.priming.accuracy")
    spy.watch("moe_train.priming.finetune")
    spy.watch("moe_models.stream")
    spy.watch("moe_models.save_pretrained")
    for optional in ("moe_train.loading.load",):
        try:
            spy.watch(optional)
        except (ImportError, AttributeError):
            pass
    return spy


def observe(cli, monkeypatch, run: Path, f: dict, argv: list[str]):
    """What one command line did: spied calls, exit code, stdout, files written."""
    shutil.rmtree(f["out"], ignore_errors=True)
    shutil.rmtree(f["out"].with_name("elsewhere"), ignore_errors=True)
    written = set(run.iterdir())
    with monkeypatch.context() as m:
        spy = spies(m)
        torch.manual_seed(0)
        rc, out, err = cli(*argv)
    new = sorted(p.name for p in run.iterdir() if p not in written)
    for p in run.iterdir():
        if p not in written:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    outputs = [
        sorted(str(p.relative_to(d)) for p in d.rglob("*"))
        for d in (f["out"], f["out"].with_name("elsewhere"))
        if d.exists()
    ]
    return {"calls": spy.calls, "rc": rc, "stdout": out, "new_in_run": new, "outputs": outputs}, err


def subcommand_flags():
    _, parsers = cli_module.build_parser()
    for name, parser in parsers.items():
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                yield name, action


FLAGS = list(subcommand_flags())


def test_every_subcommand_has_a_baseline(wired_run, files):
    _, parsers = cli_module.build_parser()
    missing = set(parsers) - set(baselines(wired_run, files)) - SKIPPED_COMMANDS
    assert not missing, f"add a baseline command line for {sorted(missing)} to this test"


@pytest.mark.parametrize("command", sorted(set(c for c, _ in FLAGS) - SKIPPED_COMMANDS))
def test_the_baseline_works_and_is_repeatable(cli, monkeypatch, wired_run, files, command):
    argv = baselines(wired_run, files)[command]
    first, err = observe(cli, monkeypatch, wired_run, files, argv)
    assert first["rc"] == 0, err
    again, _ = observe(cli, monkeypatch, wired_run, files, argv)
    assert again == first


@pytest.fixture(scope="module")
def baseline_seen():
    """The baseline observation of each command, made once (its repeatability is tested)."""
    return {}


@pytest.mark.parametrize(
    "command, action", FLAGS, ids=[f"{c} {a.option_strings[-1]}" for c, a in FLAGS]
)
def test_every_flag_changes_what_the_command_does(
    cli, monkeypatch, wired_run, files, baseline_seen, command, action
):
    if command in SKIPPED_COMMANDS:
        pytest.skip(f"{command} passes its arguments on unread")
    argv = baselines(wired_run, files)[command]
    value = value_for(action, command, wired_run, files)
    assert value is not None, f"no value known for {command} {action.option_strings[-1]}"
    flag = [action.option_strings[-1], *value]
    if command not in baseline_seen:
        baseline_seen[command] = observe(cli, monkeypatch, wired_run, files, argv)[0]
    changed, err = observe(cli, monkeypatch, wired_run, files, [*argv, *flag])
    base = baseline_seen[command]
    assert changed != base, f"{command} {' '.join(flag)} changed nothing: not wired ({err})"


def test_an_unwired_flag_is_caught(cli, monkeypatch, wired_run, files):
    from moe_train.commands import info

    real = info.add_arguments

    def with_a_stray_flag(p):
        real(p)
        p.add_argument("--stray", type=int, default=0)

    monkeypatch.setattr(info, "add_arguments", with_a_stray_flag)
    base, _ = observe(cli, monkeypatch, wired_run, files, ["info"])
    stray, _ = observe(cli, monkeypatch, wired_run, files, ["info", "--stray", "3"])
    assert stray == base and base["rc"] == 0


def test_train_flags_reach_the_run_config(cli, monkeypatch, wired_run, files):
    """The train flags that name a training field land in that field (not just anywhere)."""
    from moe_train.commands import train as train_command
    from moe_train.config import TrainConfig

    seen = {}

    def record(cfg, opts):
        seen["cfg"], seen["opts"] = cfg, opts
        return fake_train(cfg, opts)

    monkeypatch.setattr("moe_train.trainer.train", record)
    defaults = TrainConfig()
    for name in train_command.TRAIN_FLAGS:
        value = {"device": "cpu", "lr": "0.5"}.get(name, "4")
        rc, _, err = cli("train", "--out", files["out"], f"--{name.replace('_', '-')}", value)
        assert rc == 0, err
        expected = type(getattr(defaults, name))(value)
        assert expected != getattr(defaults, name), name
        assert getattr(seen["cfg"].train, name) == expected, name
    rc, _, err = cli("train", "--out", files["out"], "--seq-len", "24", "--precision", "bf16")
    assert rc == 0, err
    assert seen["cfg"].model.seq_len == 24 and seen["cfg"].train.precision == "bf16"
    assert moe_models.get_config(seen["cfg"].model).seq_len == 24
