"""The Python examples of the README and of moe-layers' README (its PyPI page) run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "packages/layers/README.md"]
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
