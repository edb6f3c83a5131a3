"""Every package is typed and versioned, and declares only what it imports (its dependencies and
extras); moe-kernels installs without Triton."""

import ast
import importlib
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())
# distribution -> the import names that use it, where they differ from the distribution's name
IMPORTS_OF = {
    "cupy-cuda12x": ("cupy",),
    "lm-eval": ("lm_eval",),
    "tensorboard": ("torch.utils.tensorboard",),
}


def _meta(package: str) -> dict:
    return tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())["project"]


def _dist(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower()


def _imported_modules(package: str) -> set[str]:
    found = set()
    for path in (ROOT / "packages" / package / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_package_is_typed_and_versioned(package):
    module = importlib.import_module(f"moe_{package}")
    assert module.__version__ == _meta(package)["version"]
    assert (ROOT / "packages" / package / "src" / f"moe_{package}" / "py.typed").is_file()


@pytest.mark.parametrize("package", PACKAGES)
def test_every_declared_dependency_is_imported(package):
    meta = _meta(package)
    declared = [*meta.get("dependencies", [])]
    for extra in meta.get("optional-dependencies", {}).values():
        declared += extra
    imported = _imported_modules(package)
    unused = []
    for dist in {_dist(r) for r in declared}:
        names = IMPORTS_OF.get(dist, (dist.replace("-", "_"),))
        if not any(m == n or m.startswith(n + ".") for m in imported for n in names):
            unused.append(dist)
    assert unused == [], f"moe-{package} declares {unused} but never imports them"


def test_kernels_leave_triton_to_an_extra():
    meta = _meta("kernels")
    assert "triton" not in {_dist(r) for r in meta["dependencies"]}
    assert "triton" in {_dist(r) for r in meta["optional-dependencies"]["triton"]}


def test_the_cpu_path_never_imports_triton(tmp_path):
    """With Triton unimportable, a layer runs forward and backward on the CPU, and forcing
    the Triton backend says what is missing."""
    import subprocess

    script = """
import sys
sys.modules["triton"] = None  # any `import triton` now fails
import torch, moe_kernels, moe_layers
layer = moe_layers.SigmaMoE(16, n_experts=4, expert_size=8, k=2)
x = torch.randn(5, 16, requires_grad=True)
layer(x).sum().backward()
w, idx = torch.randn(4, 16, 8), torch.zeros(5, 1, dtype=torch.long)
try:
    moe_kernels.expert_matmul(x.detach(), w, idx, backend="triton")
except ValueError as e:
    print(e)
assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules if sys.modules[m])
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "moe-kernels[triton]" in done.stdout
