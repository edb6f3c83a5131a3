"""The examples of the READMEs (the project's, moe-layers' PyPI page, moe-models') run as written,
and the README's plugin commands train and evaluate the plugin it shows."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [
    ROOT / "README.md",
    ROOT / "packages/layers/README.md",
    ROOT / "packages/models/README.md",
]
BLOCKS = [
    (readme, block)
    for readme in READMES
    for block in re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
]


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_readme_has_python_examples(readme):
    assert "```python" in readme.read_text(), f"{readme} shows no ```python example"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    readme, block = BLOCKS[index]
    exec(compile(block, f"{readme.name} example {index}", "exec"), {"__name__": "readme"})


def test_the_readme_plugin_trains_and_evaluates_through_the_cli(tmp_path, monkeypatch, capsys):
    """The `# my_layer.py` block saved as that file, then the README's commands after it, with a
    smaller batch and evaluation so that the test stays quick."""
    from moe_models import registry
    from moe_train.cli import main

    # a registry without the name the README's Python example (run in this process) registered
    monkeypatch.setattr(
        registry, "_REGISTRY", {k: v for k, v in registry._REGISTRY.items() if k != "glu"}
    )
    text = (ROOT / "README.md").read_text()
    plugin = next(
        b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "my_layer.py" in b
    )
    commands = re.search(r"```python\n# my_layer\.py.*?```\s*```bash\n(.*?)```", text, flags=re.S)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_layer.py").write_text(plugin)
    lines = commands.group(1).replace("\\\n", " ").strip().splitlines()
    quick = {
        "train": [
            "--batch-size",
            "4",
            "--no-progress",
            "--no-tensorboard",
            "train.final_eval_batches=2",
        ],
        "eval": ["--max-batches", "2", "--batch-size", "4"],
    }
    for line in lines:
        argv = shlex.split(line)
        assert argv[:4] == ["uv", "run", "--frozen", "moe-train"], line
        rc = main([*argv[4:], *quick[argv[4]]])
        assert rc == 0, capsys.readouterr().err
    assert "glu" in (tmp_path / "runs/glu/config.json").read_text()
    assert list((tmp_path / "runs/glu/checkpoints").glob("eval-*.json"))


# a ```bash block running `moe-train info ... --plan`, the ```text block of what it prints, and
# the next ```bash block with the torchrun command that trains that plan
PLAN = (
    r"```bash\n(uv run --frozen moe-train info [^`]*?--plan[^`]*?)```\s*```text\n(.*?)```"
    r".*?```bash\n([^`]*?torchrun[^`]*?)```"
)


def _argv(block: str) -> list[str]:
    lines = [line for line in block.splitlines() if not line.lstrip().startswith("#")]
    return shlex.split(" ".join(lines).replace("\\", " "))


@pytest.mark.parametrize(
    "readme", [ROOT / "README.md", ROOT / "packages/train/README.md"], ids=["root", "train"]
)
def test_the_readme_memory_plans_are_what_info_prints_and_torchrun_runs_them(readme, capsys):
    """Each plan shown is `moe-train info --plan`'s output today, and the torchrun command after
    it runs that plan: nodes x GPUs = --nproc, c10d rendezvous, the same preset and KEY=VALUEs,
    a `train` command line that parses."""
    from moe_train.cli import build_parser, main

    found = re.findall(PLAN, readme.read_text(), flags=re.S)
    assert found, f"{readme} shows no memory plan with its torchrun command"
    for plan_block, table, run_block in found:
        plan = _argv(plan_block)
        assert plan[:5] == ["uv", "run", "--frozen", "moe-train", "info"], plan
        capsys.readouterr()
        assert main(plan[4:]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out == table
        run = _argv(run_block)
        assert run[:4] == ["uv", "run", "--frozen", "torchrun"], run
        m = run.index("-m")
        assert run[m + 1 : m + 3] == ["moe_train.cli", "train"], run
        options = dict(zip(run[4:m:2], run[5:m:2], strict=True))
        assert options["--rdzv-backend"] == "c10d" and options["--rdzv-endpoint"].endswith(":29500")
        nproc = int(plan[plan.index("--nproc") + 1])
        assert int(options["--nnodes"]) * int(options["--nproc-per-node"]) == nproc
        train = run[m + 3 :]
        assert train[train.index("--preset") + 1] == plan[5]
        assert sorted(a for a in train if "=" in a) == sorted(a for a in plan if "=" in a)
        build_parser()[1]["train"].parse_intermixed_args(train)
