"""Plugins and trust: a plugin a run or an export records is imported only when the user names
it (`--plugin`) or passes `--trust-plugins`; otherwise every command that loads the model says
which plugin it needs and imports nothing. Each layer a plugin registers is held to the layer
contract where it is built, and a plugin's own failures are one line naming it.

The process a test runs in has imported the plugin once it trained with it, so each test forgets
it again (sys.modules and the registry), as a fresh process would have it."""

import json
import sys

import pytest
from moe_models import registry
from moe_train import plugins

PLUGIN = """
import dataclasses
from pathlib import Path

import moe_layers
import moe_models
from torch import nn

Path(__file__).with_suffix(".imported").write_text("imported")


class {cls}(moe_layers.MoEModule):
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(moe_layers.LayerConfig):
        width: int = 8
        out_scale: int = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        d = self.config.d_model
        self.w1 = nn.Linear(d, self.config.width)
        self.w2 = nn.Linear(self.config.width, d * self.config.out_scale)

    def forward_tokens(self, x_TD, token_ids_T):
        return self.w2(self.w1(x_TD).tanh())


moe_models.register_ffn("{name}", {cls}.Config)
"""


def write_plugin(folder, name="trusty", **fmt):
    path = folder / f"{name}.py"
    path.write_text(PLUGIN.format(cls="Layer" + name.title(), name=name, **fmt))
    return path


def forget(monkeypatch, path, name):
    """As a fresh process: the plugin not imported, its layer not registered."""
    monkeypatch.delitem(sys.modules, plugins._module_name(path), raising=False)
    monkeypatch.setattr(
        registry, "_REGISTRY", {k: v for k, v in registry._REGISTRY.items() if k != name}
    )
    path.with_suffix(".imported").unlink(missing_ok=True)


@pytest.fixture
def plugin_run(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    path = write_plugin(tmp_path)
    run = tmp_path / "run"
    rc, _, err = cli.train(
        run, "--plugin", path, "ffn=trusty", "--max-steps", "2", preset="tiny-dense"
    )
    assert rc == 0, err
    rc, _, err = cli("export", run, tmp_path / "exported", "--plugin", path)
    assert rc == 0, err
    forget(monkeypatch, path, "trusty")
    return run, path


COMMANDS = {
    "eval": lambda r: ["eval", r, "--max-batches", "1", "--batch-size", "2", "--no-progress"],
    "generate": lambda r: ["generate", r, "--prompt", "a", "--max-new-tokens", "2"],
    "prime": lambda r: ["prime", r, "--task", "{task}", "--max-examples", "2", "--no-progress"],
    "export": lambda r: ["export", r, r.parent / "again"],
    "finetune": lambda r: (
        ["finetune", r, "--task", "{task}", "--max-steps", "1"]
        + ["--max-examples", "2", "--out", r.parent / "ft", "--no-progress"]
    ),
    "resume": lambda r: (
        ["train", "--out", r, "--resume", "--max-steps", "3", "--no-progress"]
        + ["--no-tensorboard"]
    ),
}


def _argv(command, target):
    import moe_data

    task = str(moe_data.example_task_path())
    return [str(a).replace("{task}", task) for a in COMMANDS[command](target)]


CASES = [(c, "run") for c in COMMANDS] + [
    (c, "export")
    for c in COMMANDS
    if c not in ("resume", "finetune")  # not for an export
]


@pytest.mark.parametrize("command, source", CASES)
def test_a_recorded_plugin_is_not_imported_unasked(cli, plugin_run, command, source):
    run, path = plugin_run
    target = run if source == "run" else run.parent / "exported"
    rc, _, err = cli(*_argv(command, target))
    offered = ["--trust-plugins"] if command != "resume" else []
    cli.assert_one_line_error(rc, err, str(path), f"--plugin {path}", *offered)
    assert not path.with_suffix(".imported").exists()


@pytest.mark.parametrize(
    "command, how",
    [(c, h) for c in ("eval", "generate", "export") for h in ("--plugin", "--trust-plugins")]
    + [("resume", "--plugin")],
)
def test_a_named_or_trusted_plugin_is_imported(cli, plugin_run, command, how):
    run, path = plugin_run
    extra = ["--plugin", str(path)] if how == "--plugin" else ["--trust-plugins"]
    rc, _, err = cli(*_argv(command, run), *extra)
    assert rc == 0, err
    assert path.with_suffix(".imported").exists()


def test_lm_eval_takes_trust_plugins_as_a_model_arg(plugin_run):
    pytest.importorskip("lm_eval")
    from moe_train.errors import CLIError
    from moe_train.lm_eval_adapter import MoELM

    run, path = plugin_run
    with pytest.raises(CLIError, match="--trust-plugins"):
        MoELM(path=str(run), device="cpu")
    assert MoELM(path=str(run), device="cpu", trust_plugins="True").model is not None


@pytest.mark.parametrize(
    "body, needles",
    [
        ("raise SystemExit(0)\n", ["SystemExit"]),
        ("raise SystemExit('bye')\n", ["SystemExit", "bye"]),
        ("import sys\nsys.exit(3)\n", ["SystemExit", "3"]),
        ("raise RuntimeError('boom')\n", ["RuntimeError", "boom"]),
        ("raise KeyError('k')\n", ["KeyError"]),
        ("import no_such_module_at_all\n", ["no_such_module_at_all"]),
    ],
)
def test_a_plugin_that_fails_on_import_is_one_line(cli, tmp_path, body, needles):
    broken = tmp_path / "broken.py"
    broken.write_text(body)
    rc, _, err = cli.train(tmp_path / "r", "--max-steps", "1", "--plugin", broken)
    assert rc == 2
    cli.assert_one_line_error(rc, err, str(broken), *needles)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_module_plugin_that_exits_on_import_is_one_line(cli, tmp_path, monkeypatch):
    (tmp_path / "exits_on_import.py").write_text("raise SystemExit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, _, err = cli.train(tmp_path / "r", "--max-steps", "1", "--plugin", "exits_on_import")
    cli.assert_one_line_error(rc, err, "exits_on_import", "SystemExit")
    assert "exits_on_import" not in sys.modules


def test_a_plugin_layer_of_the_wrong_width_is_the_plugins_error(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    path = write_plugin(tmp_path, "wide")
    argv = ["--plugin", path, "ffn=wide", "ffn.out_scale=2", "--max-steps", "2"]
    rc, _, err = cli.train(tmp_path / "r", *argv, preset="tiny-dense")
    assert rc == 2, err
    cli.assert_one_line_error(rc, err, f"plugin {path}", "ffn=wide", "[..., d_model]")


@pytest.mark.parametrize(
    "forward, needles",
    [
        ("return x[..., :1]", ["returned (", ", 1) for an input of shape"]),
        ("return (x, x)", ["returned tuple"]),
        ("return x.transpose(0, 1)", ["returned ("]),
        ("raise ValueError('no')", ["ValueError: no"]),
    ],
)
def test_a_plugin_layer_breaking_the_contract_in_forward(
    cli, tmp_path, monkeypatch, forward, needles
):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    path = tmp_path / "bad_forward.py"
    path.write_text(
        "import dataclasses\nimport moe_layers\nimport moe_models\nfrom torch import nn\n\n\n"
        "class Bad(nn.Module):\n"
        "    @dataclasses.dataclass(frozen=True, kw_only=True)\n"
        "    class Config(moe_layers.LayerConfig):\n"
        "        pass\n\n"
        "    def __init__(self, d_model):\n"
        "        super().__init__()\n"
        "        self.w = nn.Linear(d_model, d_model)\n\n"
        "    def forward(self, x, token_ids=None):\n"
        f"        {forward}\n\n\n"
        "Bad.Config.layer_class = Bad\n"
        "moe_models.register_ffn('bad_forward', Bad.Config)\n"
    )
    argv = ["--plugin", path, "ffn=bad_forward", "--max-steps", "2"]
    rc, _, err = cli.train(tmp_path / "r", *argv, preset="tiny-dense")
    cli.assert_one_line_error(rc, err, f"plugin {path}", "ffn=bad_forward", *needles)


def test_the_contract_check_keeps_a_good_plugin_layer_exact(tmp_path, monkeypatch):
    import moe_models
    import torch

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    path = write_plugin(tmp_path, "exact")
    plugins.load(str(path))
    cfg = moe_models.get_config("tiny-dense", ffn="exact", d_model=16, n_layers=1, n_heads=2)
    torch.manual_seed(0)
    model = moe_models.build(cfg)
    layer = model.layers[0].ffn.ffn
    x = torch.randn(2, 5, 16)
    expected = type(layer).forward(layer, x)
    assert torch.equal(layer(x), expected)
    assert json.loads(json.dumps(moe_models.config_to_dict(cfg)))["ffn"]["type"] == "exact"


def test_lm_eval_seed_is_bounded(plugin_run):
    pytest.importorskip("lm_eval")
    from moe_train.errors import CLIError
    from moe_train.lm_eval_adapter import MoELM

    run, path = plugin_run
    with pytest.raises(CLIError, match="seed must be in"):
        MoELM(path=str(run), device="cpu", seed=2**64, plugin=str(path))
