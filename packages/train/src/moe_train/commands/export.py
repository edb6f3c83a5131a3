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
    p.add_argument("--format", choices=FORMATS, default="plain")
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


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"{out} already exists and is not an empty folder; choose another")
    rundir.prepare(out, label="out")


def export_hf(loaded, out: Path) -> None:
    try:
        from moe_models.hf import MoEForCausalLM
    except ImportError as e:
        raise CLIError(
            f"--format hf needs transformers ({e.name} cannot be imported): "
            "pip install 'moe-train[hf]'"
        ) from None
    wrapper = MoEForCausalLM.from_moe_model(loaded.model, plugins=loaded.plugins)
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
    _check_out(out)
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
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {loaded.source} ({args.format}) to {out}: {files}", file=sys.stderr)
    return 0
