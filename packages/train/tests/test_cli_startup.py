"""`moe-train --help`, `--version` and every subcommand's `--help` import neither torch nor the
libraries over it (numpy, moe_data, moe_models): a person asking for help waits for argparse, not
for torch. lm-eval hands `--help` to lm-evaluation-harness, which imports torch itself."""

import subprocess
import sys

import pytest
from moe_train.cli import COMMANDS

HEAVY = ("torch", "numpy", "moe_data", "moe_models")
SCRIPT = """
import sys
from moe_train.cli import main

try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("imported:", *[m for m in {heavy!r} if m in sys.modules], file=sys.stderr)
sys.exit(code)
"""

PARSED = [c.NAME for c in COMMANDS if not getattr(c, "PASSTHROUGH", False)]


@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], []] + [[name, "--help"] for name in PARSED], ids=str
)
def test_help_and_version_import_no_torch(argv):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(heavy=HEAVY), *argv], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "printed nothing"
    imported = done.stderr.strip().splitlines()[-1]
    assert imported == "imported:", f"{argv} imported {imported.split(':')[1].strip()}"


# what `generate` on a run's DCP checkpoint must not wait for: DCP itself, DTensor and sympy
# (seconds; moe_train.dcp_reader reads the folder), the compiler (the eager custom ops), the
# libraries of the other commands
NOT_FOR_GENERATE = (
    "torch.distributed.checkpoint",
    "torch.distributed.tensor",
    "sympy",
    "torch._dynamo",
    "torch._inductor",
    "transformers",
    "lm_eval",
    "matplotlib",
    "torch.utils.tensorboard",
    "tensorboard",
)


def test_generate_on_a_run_imports_no_dcp_sympy_nor_compiler(cli, tmp_path):
    run = tmp_path / "run"
    assert cli.train(run, "--max-steps", "1")[0] == 0
    argv = ["generate", str(run), "--prompt", "The", "--max-new-tokens", "3", "--seed", "1"]
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(heavy=NOT_FOR_GENERATE), *argv],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("The"), done.stdout
    imported = done.stderr.strip().splitlines()[-1]
    assert imported == "imported:", f"generate imported {imported.split(':')[1].strip()}"
