"""`moe-train eval`: valid and test loss of a checkpoint (bpc for char/byte data, else ppl)."""

from __future__ import annotations

import json
from pathlib import Path

from moe_train.commands.common import add_plugin_flag, load_for_inference
from moe_train.config import non_negative_int, positive_int
from moe_train.errors import CLIError

NAME = "eval"
HELP = "evaluate a checkpoint on valid and test"


def add_arguments(p) -> None:
    p.add_argument(
        "checkpoint", help="a checkpoint file or a run directory (its latest checkpoint)"
    )
    p.add_argument("--data", help="data spec (default: the one the checkpoint was trained on)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument(
        "--max-batches",
        type=non_negative_int,
        default=0,
        help="evaluate only N batches per split (0: all)",
    )
    p.add_argument(
        "--seq-len", type=positive_int, help="segment length (default: the training one)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="JSON file for the metrics (default: next to the checkpoint)")
    add_plugin_flag(p)


def run(args) -> int:
    from moe_train.distributed import DistEnv
    from moe_train.evaluate import evaluate
    from moe_train.metrics import level_metrics

    payload, cfg, corpus, model, device = load_for_inference(
        args, args.checkpoint, args.data, args.device
    )
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    seq_len = args.seq_len or cfg.model.seq_len
    record = {"checkpoint": payload["path"], "step": payload["step"], "data": corpus.name}
    for split in ("valid", "test"):
        try:
            loss = evaluate(
                model,
                getattr(corpus, split),
                batch_size=args.batch_size,
                seq_len=seq_len,
                env=env,
                max_batches=args.max_batches,
            )
        except ValueError as e:
            raise CLIError(f"{split} split: {e}") from None
        record.update(level_metrics(split, loss, corpus.level))
        unit = "bpc" if f"{split}_bpc" in record else "ppl"
        print(f"{split}: loss {loss:.4f}  {unit} {record[f'{split}_{unit}']:.4f}")
    ckpt_path = Path(payload["path"])
    out = Path(args.out) if args.out else ckpt_path.parent / f"eval-{ckpt_path.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"metrics written to {out}")
    return 0
