"""`--plugin PATH_OR_MODULE`: user code, imported before a command runs, that registers layers.

A plugin is a `.py` file or an importable module (as fairseq's `--user-dir`) whose import calls
`moe_models.register_ffn(NAME, ConfigClass)`; `ffn=NAME` and `ffn.FIELD=VALUE` then build the
layer in every architecture. The run's config records each plugin (a file by its absolute path)
so that `eval`, `--resume` and every other command reading the run import it again.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from moe_train.errors import CLIError


def is_file(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or Path(spec).is_file()


def canonical(spec: str) -> str:
    """A file by its absolute path (so that the run finds it from any folder), a module as is."""
    if not isinstance(spec, str) or not spec:
        raise CLIError(f"--plugin takes a .py file or a module name, got {spec!r}")
    return str(Path(spec).expanduser().resolve()) if is_file(spec) else spec


def load(spec: str) -> None:
    """Import the plugin once per process (a second load of the same one does nothing)."""
    if is_file(spec):
        path = Path(spec)
        if not path.is_file():
            raise CLIError(f"plugin file {path} does not exist")
        name = "moe_plugin_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        if name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise CLIError(f"plugin {path} failed to import: {type(e).__name__}: {e}") from None
        return
    try:
        importlib.import_module(spec)
    except ImportError as e:
        raise CLIError(f"plugin module {spec!r} cannot be imported: {e}") from None
