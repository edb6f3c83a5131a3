"""Imports only go down the stack, and every imported third-party package is declared.

train -> models -> layers -> kernels; train -> data. A package's source may import the standard
library, the packages its `pyproject.toml` lists in `dependencies` (and optional extras), and the
siblings below it; its tests may also import its `test` dependency group.
"""

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# which siblings each package may stand on (directly or not)
BELOW = {
    "kernels": set(),
    "layers": {"kernels"},
    "models": {"layers", "kernels"},
    "data": set(),
    "train": {"models", "layers", "kernels", "data"},
}
# import name -> distribution name, where they differ
DIST_OF_IMPORT = {
    "cupy": "cupy-cuda12x",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
}
# imports that come with a declared distribution (tensorboard's writer lives in torch)
IMPLIED = {"torch.utils.tensorboard": "tensorboard"}


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def find_violations(root: Path) -> list[str]:
    """Every import in packages/*/{src,tests} that goes up the stack or is not declared."""
    problems = []
    for pkg_dir in sorted((root / "packages").iterdir()):
        meta = tomllib.loads((pkg_dir / "pyproject.toml").read_text())
        project = meta["project"]
        me = project["name"].removeprefix("moe-")
        runtime = {_dist_name(r) for r in project.get("dependencies", [])}
        for extra in project.get("optional-dependencies", {}).values():
            runtime |= {_dist_name(r) for r in extra}
        test_deps = {_dist_name(r) for r in meta.get("dependency-groups", {}).get("test", [])}
        for declared in runtime:
            sibling = declared.removeprefix("moe-")
            if declared.startswith("moe-") and sibling not in BELOW[me]:
                problems.append(
                    f"{pkg_dir.name}/pyproject.toml: moe-{me} depends on {declared}, which is not below it"
                )
        for part, allowed in (("src", runtime), ("tests", runtime | test_deps)):
            # a test may import a helper module that sits beside it (e.g. a multiprocessing worker)
            local = {p.stem for p in (pkg_dir / part).glob("*.py")} if part == "tests" else set()
            for path in sorted((pkg_dir / part).rglob("*.py")):
                for lineno, module in _imports(path):
                    top = module.split(".")[0]
                    where = f"{path.relative_to(root)}:{lineno}"
                    if top in sys.stdlib_module_names or top in local or top == f"moe_{me}":
                        continue
                    if top.startswith("moe_"):
                        sibling = top.removeprefix("moe_")
                        if sibling not in BELOW[me]:
                            problems.append(
                                f"{where}: moe_{me} imports {top}, which is not below it"
                            )
                        elif f"moe-{sibling}" not in allowed:
                            problems.append(
                                f"{where}: imports {top} but moe-{sibling} is not declared"
                            )
                        continue
                    implied = next((d for m, d in IMPLIED.items() if module.startswith(m)), None)
                    dist = DIST_OF_IMPORT.get(top, top).lower().replace("_", "-")
                    if dist not in allowed or (implied and implied not in allowed):
                        problems.append(
                            f"{where}: imports {module} but {implied or dist} is not declared"
                        )
    return problems


def test_workspace_imports_only_go_down_and_are_declared():
    assert find_violations(ROOT) == []


def _fake_workspace(tmp_path: Path, layers_source: str) -> Path:
    for name, deps in {"kernels": ["torch"], "layers": ["torch", "moe-kernels"]}.items():
        pkg = tmp_path / "packages" / name
        (pkg / "src" / f"moe_{name}").mkdir(parents=True)
        (pkg / "tests").mkdir()
        (pkg / "pyproject.toml").write_text(
            f'[project]\nname = "moe-{name}"\ndependencies = {deps!r}\n'.replace("'", '"')
        )
        (pkg / "src" / f"moe_{name}" / "__init__.py").write_text("import torch\n")
    (tmp_path / "packages/layers/src/moe_layers/sigma.py").write_text(layers_source)
    return tmp_path


def test_upward_import_is_caught(tmp_path):
    root = _fake_workspace(tmp_path, "import moe_kernels\nfrom moe_models import build\n")
    problems = find_violations(root)
    assert len(problems) == 1
    assert "moe_layers imports moe_models, which is not below it" in problems[0]


def test_undeclared_third_party_import_is_caught(tmp_path):
    root = _fake_workspace(tmp_path, "import scipy.optimize\n")
    problems = find_violations(root)
    assert len(problems) == 1 and "scipy" in problems[0] and "not declared" in problems[0]


def test_clean_fake_workspace_passes(tmp_path):
    assert find_violations(_fake_workspace(tmp_path, "import moe_kernels\nimport math\n")) == []
