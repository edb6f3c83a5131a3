"""What a run records: metrics.jsonl, TensorBoard scalars, and routing statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

BITS_LEVELS = ("char", "byte")


def uses_bpc(level: str) -> bool:
    """Character- and byte-level data are reported in bits per character, the rest in perplexity."""
    return level in BITS_LEVELS


def level_metrics(prefix: str, loss: float, level: str) -> dict[str, float]:
    """{prefix_loss, prefix_bpc} for char/byte data, {prefix_loss, prefix_ppl} otherwise."""
    out = {f"{prefix}_loss": loss}
    if uses_bpc(level):
        out[f"{prefix}_bpc"] = loss / math.log(2)
    else:
        out[f"{prefix}_ppl"] = math.exp(min(loss, 700.0))
    return out


class RoutingAccumulator:
    """Sums each routed layer's statistics over the forward passes of one logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        self.dropped: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.entropy_sum: dict[str, float] = {}
        self.passes: dict[str, int] = {}

    def add(self, stats: dict) -> None:
        for name, s in stats.items():
            counts = s.expert_counts.detach().to("cpu", torch.float64)
            self.counts[name] = self.counts.get(name, 0) + counts
            self.dropped[name] = self.dropped.get(name, 0) + int(s.dropped)
            self.tokens[name] = self.tokens.get(name, 0) + int(s.n_tokens)
            self.entropy_sum[name] = self.entropy_sum.get(name, 0.0) + float(s.entropy)
            self.passes[name] = self.passes.get(name, 0) + 1

    def summary(self, reduce_sum=None) -> dict[str, dict]:
        """Per layer: usage share per expert, mean entropy (nats), dropped share, tokens routed.

        reduce_sum, when given, sums a flat list of floats over ranks (so usage is global).
        """
        out = {}
        for name in sorted(self.counts):
            counts = self.counts[name]
            extra = [
                self.dropped[name],
                self.tokens[name],
                self.entropy_sum[name],
                self.passes[name],
            ]
            flat = counts.tolist() + extra
            if reduce_sum is not None:
                flat = reduce_sum(flat)
            e = counts.numel()
            counts_list, (dropped, tokens, entropy_sum, passes) = flat[:e], flat[e:]
            total = sum(counts_list)
            assignments = max(total, 1.0)
            out[name] = {
                "usage": [round(c / assignments, 6) for c in counts_list],
                "entropy": entropy_sum / max(passes, 1),
                "dropped_frac": dropped / assignments,
                "n_tokens": int(tokens),
            }
        return out


class MetricsLogger:
    """Appends JSON lines to DIR/metrics.jsonl and mirrors scalars to TensorBoard (DIR/tb)."""

    def __init__(self, out_dir: Path, tensorboard: bool = True) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tb"))

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (a resumed run re-logs the steps past its checkpoint)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is None:
            return
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key.replace("_", "/", 1), value, step)
        for layer, s in record.get("routing", {}).items():
            self.writer.add_scalar(f"routing/{layer}/entropy", s["entropy"], step)
            self.writer.add_scalar(f"routing/{layer}/dropped_frac", s["dropped_frac"], step)
            self.writer.add_scalar(f"routing/{layer}/max_usage", max(s["usage"]), step)
            self.writer.add_histogram(f"routing/{layer}/usage", torch.tensor(s["usage"]), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
