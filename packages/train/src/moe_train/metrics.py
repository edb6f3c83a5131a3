"""What a run records: metrics.jsonl, TensorBoard scalars, and routing statistics."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from moe_train.errors import CLIError

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


def validation_line(step: int, loss: float, level: str) -> str:
    """`step N: validation bpc X (loss Y nats/token)` (perplexity for word and subword data)."""
    m = level_metrics("valid", loss, level)
    shown = f"bpc {m['valid_bpc']:.4f}" if "valid_bpc" in m else f"perplexity {m['valid_ppl']:.2f}"
    return f"step {step}: validation {shown} (loss {loss:.4f} nats/token)"


class RoutingAccumulator:
    """Sums each routed layer's statistics over the forward passes of one logging window.

    The sums stay on the model's device until `summary`, so that a training step never waits for
    the GPU to hand them over.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # per layer: [E + 2] = expert counts, dropped assignments, entropy sum (nats)
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.passes: dict[str, int] = {}
        # per layer with an expert bias: the latest one (the same on every rank)
        self.bias: dict[str, torch.Tensor] = {}

    def add(self, stats: dict) -> None:
        for name, s in stats.items():
            if getattr(s, "expert_bias", None) is not None:
                self.bias[name] = s.expert_bias
            row = torch.cat(
                [
                    s.expert_counts.detach().double(),
                    s.dropped_count.detach().double().reshape(1),
                    s.entropy_nats.detach().double().reshape(1),
                ]
            )
            self.sums[name] = self.sums[name] + row if name in self.sums else row
            self.tokens[name] = self.tokens.get(name, 0) + int(s.n_tokens)
            self.passes[name] = self.passes.get(name, 0) + 1

    def state_dict(self) -> dict:
        """The window so far (for a checkpoint: a resumed run completes the same window)."""
        return {
            "sums": {name: t.cpu() for name, t in self.sums.items()},
            "tokens": dict(self.tokens),
            "passes": dict(self.passes),
        }

    def load_state_dict(self, state: dict, device) -> None:
        self.sums = {name: t.to(device) for name, t in state["sums"].items()}
        self.tokens = {name: int(n) for name, n in state["tokens"].items()}
        self.passes = {name: int(n) for name, n in state["passes"].items()}

    def summary(self, reduce_sum=None) -> dict[str, dict]:
        """Per layer: usage share per expert, mean entropy (nats), dropped share, tokens routed,
        and for a layer with an expert bias the latest bias ("expert_bias").

        reduce_sum, when given, sums a flat list of floats over ranks (so usage is global).
        """
        out = {}
        for name in sorted(self.sums):
            flat = self.sums[name].tolist() + [self.tokens[name], self.passes[name]]
            if reduce_sum is not None:
                flat = reduce_sum(flat)
            counts_list, (dropped, entropy_sum, tokens, passes) = flat[:-4], flat[-4:]
            assignments = max(sum(counts_list), 1.0)
            out[name] = {
                "usage": [round(c / assignments, 6) for c in counts_list],
                "entropy": entropy_sum / max(passes, 1),
                "dropped_frac": dropped / assignments,
                "n_tokens": int(tokens),
            }
            if name in self.bias:
                out[name]["expert_bias"] = [round(b, 6) for b in self.bias[name].tolist()]
        return out


def _check_record(text: str) -> dict:
    """The record one line of metrics.jsonl holds, or ValueError saying why it is none."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"is not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        kind = "an array" if isinstance(record, list) else f"{json.dumps(record)[:20]}"
        raise ValueError(f"is JSON but no record ({kind}, not an object)")
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"has no step (a non-negative integer): step is {step!r}")
    return record


def history_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for each line of a run's metrics.jsonl, every one checked: a line that is
    not UTF-8, not JSON, not an object or without an integer step is a CLIError naming the file
    and the line. One exception: a damaged last line without its newline is what a crash or a
    full disk in the middle of an append leaves; it is dropped with a note on stderr."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CLIError(f"cannot read {path} ({e.strerror or e})") from None
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends in its newline
    out = []
    for number, raw in enumerate([*lines, torn], start=1):
        if not raw.strip():
            continue
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"is not UTF-8 (byte {raw[e.start]:#04x} at {e.start})") from None
            out.append((text, _check_record(text)))
        except ValueError as e:
            if number == len(lines) + 1:  # the torn last line
                print(
                    f"note: {path} ends in an incomplete line {number} (an interrupted write); "
                    "dropped",
                    file=sys.stderr,
                )
                continue
            raise CLIError(
                f"{path} line {number} {e}; every line must be a JSON object with its step "
                "(repair or delete that line)"
            ) from None
    return out


def read_history(path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (none when it does not exist), checked as
    `history_lines` says."""
    return [record for _, record in history_lines(path)] if path.exists() else []


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
        """Drop lines logged after `step` (a resumed run re-logs the steps past its checkpoint).
        Every line is checked first (`read_history`); the file is replaced whole, so a failed
        write leaves the old one."""
        if not self.path.exists():
            return
        kept = [line for line, record in history_lines(self.path) if record["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        try:
            tmp.write_text("".join(k + "\n" for k in kept))
            tmp.replace(self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise CLIError(f"cannot rewrite {self.path} ({e.strerror})") from None

    def log(self, record: dict) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        except OSError as e:
            raise CLIError(f"cannot write {self.path} ({e.strerror})") from None
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
