"""Checkpoints: atomic writes, the last N plus the best kept, validated loading.

A checkpoint is one `torch.save`d dict that `torch.load(weights_only=True)` can read: tensors,
numbers, strings, lists and dicts only (numpy arrays and RNG states are turned into those by
`to_plain` / `from_plain`). Files are `DIR/checkpoints/step-XXXXXXXX.pt` and `best.pt`.

Atomicity: the payload is written to a temporary file in the same directory, flushed and fsynced,
then `os.replace`d over the final name, and the directory is fsynced. A crash at any point leaves
either the old file or the new one, never a torn one; stray temporary files are ignored and
removed by the next save.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_train.errors import CLIError

FORMAT = "moe-train-checkpoint"
# 2: the layer contract (router/experts parameter names, per-name windows, model state)
VERSION = 2
STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
TMP_PREFIX = ".tmp-"


def to_plain(obj: Any) -> Any:
    """Recursively turn numpy arrays/scalars and tuples into what weights_only loading accepts."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj)).clone()}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_plain(v) for v in obj]}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    return obj


def from_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        if set(obj) == {"__tuple__"}:
            return tuple(from_plain(v) for v in obj["__tuple__"])
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    return obj


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return to_plain(state)


def set_rng_state(plain: dict) -> None:
    state = from_plain(plain)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Writer:
    """A file that remembers the OSError of a failed write: torch.save may report one as a
    RuntimeError of its own, without the cause (disk full, quota)."""

    def __init__(self, f) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def _umask() -> int:
    """The process's umask, read without setting it where Linux allows (os.umask sets it, for
    a moment, for every thread)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^Umask:\s*([0-7]+)", status, re.M).group(1), 8)
    except (OSError, AttributeError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def atomic_save(payload: dict, path: Path) -> None:
    """torch.save `payload` to `path` so that readers only ever see a complete file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pt", dir=path.parent)
        # mkstemp makes it 0600: give it the mode of every other file the run writes
        os.fchmod(fd, 0o666 & ~_umask())
    except OSError as e:
        raise CLIError(f"cannot write checkpoint {path} ({e.strerror or e})") from None
    writer = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _Writer(f)
            torch.save(payload, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except (OSError, RuntimeError) as e:
        Path(tmp_name).unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else writer and writer.error
        if cause is None:
            raise
        raise CLIError(
            f"cannot write checkpoint {path} ({cause.strerror or cause}); "
            "the earlier checkpoints are intact"
        ) from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a checkpoint; any problem is a one-line CLIError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = latest(path) or path
        if path.is_dir():
            raise CLIError(f"no checkpoint found in {path}")
    if not path.is_file():
        raise CLIError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message goes on to suggest weights_only=False: never for a file like this
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(e))
        what = f"a reference to {found.group(1)}" if found else "objects"
        raise CLIError(
            f"checkpoint {path} is refused: it holds {what} beyond tensors and plain data, "
            "which loading would run as code (moe-train writes no such checkpoint)"
        ) from None
    except Exception as e:
        raise CLIError(f"checkpoint {path} is corrupt or truncated ({_reason(e)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CLIError(f"{path} is not a moe-train checkpoint")
    if payload.get("version") != VERSION:
        raise CLIError(
            f"checkpoint {path} has format version {payload.get('version')}, expected {VERSION}"
        )
    missing = [k for k in ("run_config", "model", "step") if k not in payload]
    if missing:
        raise CLIError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    payload["path"] = str(path)
    return payload


def _reason(e: Exception) -> str:
    """The first line of an exception's message, whole (torch's go on for paragraphs)."""
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def load_newest(run_or_ckpt_dir: str | Path, on_skip=None) -> dict | None:
    """The newest step checkpoint of a run that loads (None: there is none at all).

    A newer one that does not load (truncated, corrupt) is passed over: `on_skip(path, message)`
    is called for it. When none loads, the newest one's error is raised.
    """
    d = Path(run_or_ckpt_dir)
    if (d / "checkpoints").is_dir():
        d = d / "checkpoints"
    files = [path for _, path in reversed(step_files(d))]
    first_error = None
    for path in files:
        try:
            return load(path)
        except CLIError as e:
            first_error = first_error or e
            if on_skip is not None:
                on_skip(path, str(e))
    if first_error is not None:
        raise CLIError(f"no checkpoint in {d} loads; the newest: {first_error}")
    return None


def describe_mismatch(model: torch.nn.Module, state: dict) -> str:
    """What differs between `model`'s state dict and `state`: missing, unexpected and
    differently shaped entries, the first of each named."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" and {len(items) - 1} more" if len(items) > 1 else ""
            label = {"shape": "different shape"}.get(what, what)
            parts.append(f"{len(items)} {label} ({items[0]}{more})")
    return "; ".join(parts) or "the entries match but do not load"


def step_files(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the step checkpoints in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = STEP_FILE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(run_or_ckpt_dir: str | Path) -> Path | None:
    """The newest step checkpoint of a run directory (or of its checkpoints/ directory)."""
    d = Path(run_or_ckpt_dir)
    if (d / "checkpoints").is_dir():
        d = d / "checkpoints"
    files = step_files(d)
    return files[-1][1] if files else None


class CheckpointManager:
    """Saves step checkpoints into `ckpt_dir`, keeping the newest `keep_last` and `best.pt`."""

    def __init__(self, ckpt_dir: str | Path, keep_last: int) -> None:
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last

    def save(self, payload: dict, step: int, is_best: bool = False) -> Path:
        payload = {"format": FORMAT, "version": VERSION, **payload}
        path = self.dir / f"step-{step:08d}.pt"
        atomic_save(payload, path)
        if is_best:
            atomic_save(payload, self.dir / "best.pt")
        self._prune()
        return path

    def _prune(self) -> None:
        for _, old in step_files(self.dir)[: -self.keep_last]:
            old.unlink(missing_ok=True)
        for stray in self.dir.glob(TMP_PREFIX + "*"):
            stray.unlink(missing_ok=True)
