"""What the commands that read a model load: a run (its folder, or one checkpoint file) or an
export (`moe-train export`, plain or Hugging Face), with the tokenizer that travels with it.

A run's tokenizer is `RUN/tokenizer.json` (the trainer writes it when the run starts), an
export's `OUT/tokenizer.json`; commands encode and decode with it, never with the corpus, so
they work after the corpus has moved or gone. A run written before runs kept their tokenizer
gets an error saying so and how to add the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import moe_data
import moe_models
import safetensors.torch
import torch

from moe_train import checkpoint as ckpt
from moe_train import plugins as plugins_mod
from moe_train.config import RunConfig, load_plugins
from moe_train.errors import CLIError
from moe_train.plugins import canonical

TOKENIZER = "tokenizer.json"
WEIGHTS = "model.safetensors"
HF_MODEL_TYPE = "moe-lm"
HF_PREFIX = "model."


@dataclass
class Loaded:
    """model: on `device`, in eval mode. folder: the run or export folder (its tokenizer, the
    results of prime). source: the checkpoint file or export folder read. name: a short name of
    the source for result files. data: the `--data` spec the model was trained on, if known.
    run_config: the checkpoint's RunConfig (None for an export). payload: the checkpoint dict."""

    model: torch.nn.Module
    vocab: object | None
    folder: Path
    source: Path
    name: str
    step: int | None
    data: str | None
    plugins: list[str]
    device: torch.device
    run_config: RunConfig | None = None
    payload: dict | None = None

    @property
    def config(self):
        return self.model.config


def run_folder(checkpoint: Path) -> Path:
    """RUN for RUN/checkpoints/step-N (a checkpoint elsewhere: its own folder)."""
    parent = Path(checkpoint).parent
    return parent.parent if parent.name == "checkpoints" else parent


def export_kind(path: Path) -> str | None:
    """ "plain" or "hf" for a folder `moe-train export` wrote, else None."""
    config = path / "config.json"
    if not (path.is_dir() and (path / WEIGHTS).is_file() and config.is_file()):
        return None
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("format") == moe_models.saving.FORMAT:
        return "plain"
    return "hf" if data.get("model_type") == HF_MODEL_TYPE else None


def load_vocab(folder: Path, *, what: str = "run"):
    """The tokenizer saved in `folder`; CLIError naming the missing file otherwise."""
    path = Path(folder) / TOKENIZER
    if not path.is_file():
        raise CLIError(
            f"{what} {folder} has no {TOKENIZER} (runs written before moe-train kept their "
            "tokenizer have none): pass --data SPEC to use that corpus's vocabulary, or save it "
            f"into the run with moe_data.save_tokenizer(moe_data.load(SPEC).vocab, '{path}')"
        )
    try:
        return moe_data.load_tokenizer(path)
    except moe_data.DataError as e:
        raise CLIError(str(e).strip().splitlines()[0]) from None


def _load_plugins(specs: list[str]) -> list[str]:
    specs = list(dict.fromkeys(canonical(s) for s in specs))
    load_plugins(specs)
    return specs


def _model_config(d: dict, where: str, plugins: list[str], missing: list[str]):
    try:
        return moe_models.config_from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        if missing:
            raise CLIError(plugins_mod.not_imported(where, missing)) from None
        hint = f" (its layers come from {', '.join(plugins)})" if plugins else ""
        raise CLIError(f"{where}: model config is not valid: {e}{hint}") from None


def _load_weights(model: torch.nn.Module, path: Path, prefix: str) -> None:
    """Load a safetensors file into `model`; names tied to a loaded one may be absent."""
    try:
        weights = safetensors.torch.load_file(str(path))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"{path} cannot be read ({reason})") from None
    if prefix:
        weights = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
    own = model.state_dict()
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError:
        raise CLIError(
            f"{path} does not fit the model of its config.json: "
            f"{ckpt.describe_mismatch(model, weights)}"
        ) from None
    loaded_storage = {own[k].data_ptr() for k in weights if k in own}
    missing = [k for k in missing if own[k].data_ptr() not in loaded_storage]
    if missing or unexpected:
        raise CLIError(
            f"{path} does not fit the model of its config.json: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}"
        )


def _load_export(path: Path, kind: str, plugins: list[str], trust: bool) -> dict:
    config = json.loads((path / "config.json").read_text())
    if kind == "hf":
        model_dict, prefix = config.get("moe_model"), HF_PREFIX
        source = config.get("moe_source", {})
    else:
        model_dict, prefix = config.get("model"), ""
        source = config.get("source", {})
    named = _load_plugins(plugins)
    recorded = [canonical(s) for s in config.get("plugins", [])]
    missing = plugins_mod.load_recorded(recorded, trust=trust)
    specs = list(dict.fromkeys([*recorded, *named]))
    if not isinstance(model_dict, dict):
        raise CLIError(f"{path / 'config.json'} holds no model config")
    where = f"the export {path}"
    model = moe_models.build(_model_config(model_dict, where, specs, missing))
    _load_weights(model, path / WEIGHTS, prefix)
    return dict(
        model=model,
        folder=path,
        source=path,
        name="export",
        step=source.get("step"),
        data=source.get("data"),
        plugins=specs,
    )


def load_model_state(model: torch.nn.Module, payload: dict) -> None:
    """A checkpoint's model state into a plain model; a one-line CLIError naming what does not
    fit."""
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, TypeError, AttributeError):
        raise CLIError(
            f"checkpoint {payload['path']} does not fit this model architecture: "
            f"{ckpt.describe_mismatch(model, payload['model'])}"
        ) from None


def _load_checkpoint(path: Path, plugins: list[str], trust: bool) -> dict:
    _load_plugins(plugins)
    payload = ckpt.load(path)
    where = f"the run of {payload['path']}"
    cfg = RunConfig.from_dict(payload["run_config"], trust_plugins=trust, where=where)
    model = moe_models.build(cfg.model)
    load_model_state(model, payload)
    source = Path(payload["path"])
    return dict(
        model=model,
        folder=run_folder(source),
        source=source,
        name=source.stem,
        step=int(payload["step"]),
        data=cfg.data,
        plugins=list(dict.fromkeys([*cfg.plugins, *(canonical(p) for p in plugins)])),
        run_config=cfg,
        payload=payload,
    )


def load(
    path: str | Path,
    *,
    device: str = "auto",
    plugins: list[str] = (),
    trust_plugins: bool = False,
    tokenizer: bool = True,
    data: str | None = None,
) -> Loaded:
    """The model of a run folder, a checkpoint file or an export folder, on `device`, in eval
    mode, with the tokenizer saved beside it (`tokenizer=False`: the tokenizer if there is one,
    else None). `data`: take the vocabulary of that `--data` corpus instead (for runs written
    before runs kept their tokenizer). `plugins` are imported; the plugins the run or export
    records only with `trust_plugins` (else the error says which one it needs)."""
    from moe_train.distributed import pick_device

    path = Path(path)
    device_ = pick_device(device)
    kind = export_kind(path)
    parts = (
        _load_export(path, kind, list(plugins), trust_plugins)
        if kind
        else _load_checkpoint(path, list(plugins), trust_plugins)
    )
    what = "export" if kind else "run"
    if data is not None:
        from moe_train.data import load_corpus

        vocab = load_corpus(data).vocab
    elif tokenizer or (parts["folder"] / TOKENIZER).is_file():
        vocab = load_vocab(parts["folder"], what=what)
    else:
        vocab = None
    size = parts["model"].config.vocab_size
    if vocab is not None and vocab.size != size:
        origin = f"--data {data}" if data is not None else str(parts["folder"] / TOKENIZER)
        raise CLIError(
            f"{parts['source']} has a vocabulary of {size}, its tokenizer ({origin}) one of "
            f"{vocab.size}"
        )
    parts["model"] = parts["model"].to(device_).eval()
    return Loaded(vocab=vocab, device=device_, **parts)


def encode(vocab, text: str) -> list[int]:
    try:
        return [int(i) for i in vocab.encode(text)]
    except moe_data.DataError as e:
        raise CLIError(f"cannot encode the text with this model's tokenizer: {e}") from None


def same_vocabulary(a, b) -> bool:
    return a.level == b.level and a.to_json() == b.to_json()
