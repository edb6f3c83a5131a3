"""`moe-train export`: a model for use outside moe-train.

`--format plain` (default): OUT/model.safetensors, OUT/config.json (`moe_models.save_pretrained`:
the model config and what rebuilds it) and the tokenizer files; loading needs only torch,
safetensors and moe-models (the recipe is in the README). `--format hf`: a Hugging Face
transformers checkpoint (`moe_models.hf`, the `moe-models[hf]` extra) with the same tokenizer
files and a tokenizer_config.json, loadable with `AutoModelForCausalLM` after
`moe_models.hf.register()`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from moe_train import rundir
from moe_train.commands.common import add_plugin_flag, add_vocab_data_flag
from moe_train.errors import CLIError

NAME = "export"
HELP = "write a model as safetensors + config (+ tokenizer), or as a Hugging Face checkpoint"
FORMATS = ("plain", "hf")


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="a run directory (its latest checkpoint) or checkpoint file")
    p.add_argument("out", help="the folder to write (new, or empty)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="plain",
        help="plain: model.safetensors + config.json for moe_models.load_pretrained (default); "
        "hf: a transformers checkpoint for AutoModelForCausalLM (needs the hf extra)",
    )
    add_vocab_data_flag(p)
    add_plugin_flag(p, trust=True)


def source_record(loaded) -> dict:
    """Where the model came from: enough to find the run and its data again."""
    cfg = loaded.run_config
    return {
        "checkpoint": str(loaded.source.resolve()),
        "step": loaded.step,
        "preset": None if cfg is None else cfg.preset,
        "data": loaded.data,
    }


def _check_out(out: Path) -> bool:
    """Create `out` (new, or an empty folder); whether it was created here."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"{out} already exists and is not an empty folder; choose another")
    created = not out.exists()
    rundir.prepare(out, label="out")
    return created


def _hf_classes():
    try:
        from moe_models.hf import MoEForCausalLM
    except ImportError as e:
        raise CLIError(
            f"--format hf needs transformers ({e.name} cannot be imported): in this repository "
            "uv run --frozen --all-packages --extra hf moe-train export ...; installed: "
            "pip install 'moe-train[hf]'"
        ) from None
    return MoEForCausalLM


def _usual_modes(out: Path) -> None:
    """Every file of the export with the mode a new file gets (some writers make theirs 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    for path in out.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)


def export_hf(loaded, out: Path) -> None:
    wrapper = _hf_classes().from_moe_model(loaded.model, plugins=loaded.plugins)
    wrapper.config.moe_source = source_record(loaded)
    wrapper.save_pretrained(out)
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n"
    )


def run(args) -> int:
    import moe_data
    import moe_models

    from moe_train import loading

    loaded = loading.load(
        args.checkpoint,
        device="cpu",
        plugins=args.plugin,
        trust_plugins=args.trust_plugins,
        data=args.data,
    )
    out = Path(args.out)
    if args.format == "hf":
        _hf_classes()  # before anything is written
    created = _check_out(out)
    try:
        if args.format == "hf":
            export_hf(loaded, out)
        else:
            moe_models.save_pretrained(
                loaded.model,
                out,
                plugins=loaded.plugins,
                tokenizer=loading.TOKENIZER,
                source=source_record(loaded),
            )
        moe_data.save_tokenizer(loaded.vocab, out / loading.TOKENIZER)
        _usual_modes(out)
    except BaseException:
        # a failed export leaves nothing behind: the folder as it was (absent, or empty)
        for path in out.iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if created:
            out.rmdir()
        raise
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {loaded.source} ({args.format}) to {out}: {files}", file=sys.stderr)
    return 0
