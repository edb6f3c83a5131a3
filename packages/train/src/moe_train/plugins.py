"""`--plugin PATH_OR_MODULE`: user code, imported before a command runs, that registers layers.

A plugin is a `.py` file or an importable module (as fairseq's `--user-dir`) whose import calls
`moe_models.register_ffn(NAME, ConfigClass)`; `ffn=NAME` and `ffn.FIELD=VALUE` then build the
layer in every architecture. The run's config records each plugin (a file by its absolute path)
so that the commands reading the run can say which one it needs; they import a recorded plugin
only when the user asks (`--plugin`, or `--trust-plugins` for every plugin a run records), as
transformers' `trust_remote_code`: loading a model never runs code nobody named.

Each layer a plugin registers is held to the layer contract where it is built: its output must
have its input's shape, and an error inside it is reported as the plugin's (one line naming the
plugin and the layer), not as a bug of moe-train.
"""

from __future__ import annotations

import functools
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


def _module_name(path: Path) -> str:
    return "moe_plugin_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]


def is_loaded(spec: str) -> bool:
    """Whether this process has imported the plugin already (importing it again runs nothing)."""
    name = _module_name(Path(spec)) if is_file(spec) else spec
    return name in sys.modules


def load(spec: str) -> None:
    """Import the plugin once per process (a second load of the same one does nothing). The
    plugin's own errors, `SystemExit` included, are one CLIError naming it."""
    before = _registered()
    if is_file(spec):
        path = Path(spec)
        if not path.is_file():
            raise CLIError(f"plugin file {path} does not exist")
        name = _module_name(path)
        if name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:
            del sys.modules[name]
            raise CLIError(f"plugin {path} failed to import: {type(e).__name__}: {e}") from None
    else:
        if spec in sys.modules:
            return
        try:
            importlib.import_module(spec)
        except ImportError as e:
            raise CLIError(f"plugin module {spec!r} cannot be imported: {e}") from None
        except (Exception, SystemExit) as e:
            sys.modules.pop(spec, None)
            raise CLIError(f"plugin {spec} failed to import: {type(e).__name__}: {e}") from None
    for layer, config_cls in _registered().items():
        if before.get(layer) is not config_cls:
            _guard(config_cls, layer, spec)


def _registered() -> dict[str, type]:
    # imported here: moe_models imports torch, and `--help` (which imports this) must not
    import moe_models

    return {name: moe_models.ffn_config_class(name) for name in moe_models.registered_ffns()}


def load_recorded(specs: list[str], *, trust: bool) -> list[str]:
    """The plugins a run or export records that are not imported: each one the user did not name
    (with `--plugin`, imported before this) stays unimported unless `trust`."""
    missing = []
    for spec in specs:
        if is_loaded(spec):
            continue
        if trust:
            load(spec)
        else:
            missing.append(spec)
    return missing


def not_imported(where: str, missing: list[str], offer_trust: bool = True) -> str:
    """What to say when a run or export records plugins that were not imported."""
    names = ", ".join(missing)
    trust = " (or --trust-plugins to import every plugin it records)" if offer_trust else ""
    return (
        f"{where} was made with the plugin {names}, which is not imported unless you ask: pass "
        f"--plugin {missing[0]}{trust}"
    )


def _guard(config_cls: type, layer: str, spec: str) -> None:
    """Make `config_cls.build()` return layers whose forward is checked against the contract."""
    build = config_cls.build
    if getattr(build, "checks_plugin", None) is not None:
        return

    @functools.wraps(build)
    def checked_build(self):
        module = build(self)
        module.forward = functools.partial(_checked_forward, module.forward, layer, spec)
        return module

    checked_build.checks_plugin = spec
    config_cls.build = checked_build


def _shape(x) -> str:
    return str(tuple(x.shape)) if hasattr(x, "shape") else type(x).__name__


def _checked_forward(forward, layer: str, spec: str, x, *args, **kwargs):
    import torch

    where = f"plugin {spec}: layer ffn={layer}"
    try:
        y = forward(x, *args, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CLIError(
            f"{where} failed on an input of shape {_shape(x)}: {type(e).__name__}: {first} "
            "(a layer returns a tensor of its input's shape [..., d_model])"
        ) from None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        raise CLIError(
            f"{where} returned {_shape(y)} for an input of shape {_shape(x)}; a layer must "
            "return a tensor of its input's shape [..., d_model]"
        )
    return y
