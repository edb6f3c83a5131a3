"""Checkpoints: folders of torch.distributed.checkpoint (DCP) shards, complete or absent, the last
N plus the best kept, validated loading.

A checkpoint is a folder `DIR/checkpoints/step-XXXXXXXX/` (and `best/`) holding
- the DCP shards of the tensors (`.metadata`, `__R_0.distcp`): under `model.` the model's state
  dict, under `optimizer.` the optimiser's, both keyed by parameter name with global shapes
  (`torch.distributed.checkpoint.state_dict.get_state_dict`), so they load into any layout and
  world size, each rank reading the pieces of its own shards;
- `meta.pt`: what is the same on every rank (run config, step, scheduler, logging windows...);
- `rank-RRRRR.pt`: what each rank has of its own (data position, RNG states, model state).
`meta.pt` and the rank files are `torch.save`d dicts that `torch.load(weights_only=True)` reads:
tensors, numbers, strings, lists and dicts only (numpy arrays and RNG states are turned into
those by `to_plain` / `from_plain`).

Atomicity: every rank writes into `.tmp-step-XXXXXXXX/`; once all have written (fsynced) and
met at a barrier, rank 0 renames the folder to its final name and fsyncs the parent. A crash or a
kill -9 of any rank at any point leaves the earlier checkpoints untouched and, at worst, a
temporary folder that nothing reads and the next save removes. `best/` is made of hard links to
the files of its step folder (no second write) and swapped in by two renames.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import tempfile
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moe_train import dcp_reader
from moe_train.errors import CLIError

FORMAT = "moe-train-checkpoint"
# 2: the layer contract (router/experts parameter names, per-name windows, model state)
# 3: DCP folders (model and optimiser keyed by parameter name, sharded per rank)
VERSION = 3
STEP_DIR = re.compile(r"^step-(\d+)$")
# version 2 was one torch.save file per checkpoint, `step-N.pt`: still read for its weights
LEGACY_VERSION = 2
LEGACY_FILE = re.compile(r"^step-(\d+)\.pt$")
TMP_PREFIX = ".tmp-"
META = "meta.pt"
DCP_METADATA = ".metadata"


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


def _read(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message goes on to suggest weights_only=False: never for a file like this
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(e))
        what = f"a reference to {found.group(1)}" if found else "objects"
        raise CLIError(
            f"checkpoint {path} is refused: it holds {what} beyond tensors and plain data, "
            "which loading would run as code (moe-train writes no such checkpoint)"
        ) from None
    except Exception as e:
        raise CLIError(f"checkpoint {path.parent} is corrupt or truncated ({_reason(e)})") from None


def load(path: str | Path, *, tensors: bool = True) -> dict:
    """Read and validate a checkpoint folder (a run folder: its newest): the dict of `meta.pt`
    with "path", and with `tensors` the whole model state dict under "model", read on this one
    process. Any problem is a one-line CLIError naming the folder."""
    path = Path(path)
    if path.is_dir() and not (path / META).exists():
        found = latest(path) or _legacy_latest(path)
        if found is None:
            raise CLIError(f"no checkpoint found in {path}")
        path = found
    if not path.exists():
        raise CLIError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        return _load_legacy(path, tensors)
    if not (path / META).is_file():
        raise CLIError(f"checkpoint {path} is incomplete: no {META}")
    payload = _read(path / META)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CLIError(f"{path} is not a moe-train checkpoint")
    if payload.get("version") != VERSION:
        raise CLIError(
            f"checkpoint {path} has format version {payload.get('version')}, expected {VERSION}"
        )
    missing = [k for k in ("run_config", "step") if k not in payload]
    if missing:
        raise CLIError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    if not (path / DCP_METADATA).is_file():
        raise CLIError(f"checkpoint {path} is incomplete: no {DCP_METADATA}")
    payload["path"] = str(path)
    _check_metadata(path)
    if tensors:
        payload["model"] = read_tensors(path, "model")
    return payload


def _legacy_latest(run_or_ckpt_dir: Path) -> Path | None:
    """The newest `step-N.pt` of a run written before checkpoints were folders (version 2)."""
    d = (
        run_or_ckpt_dir / "checkpoints"
        if (run_or_ckpt_dir / "checkpoints").is_dir()
        else run_or_ckpt_dir
    )
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := LEGACY_FILE.match(p.name))]
    return max(found)[1] if found else None


def _load_legacy(path: Path, tensors: bool) -> dict:
    """A version-2 checkpoint file: its run config, step and whole model state dict. It is read
    for the model (eval, generate, export, ...); its optimiser and data states are not resumed."""
    payload = _read(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CLIError(
            f"{path} is not a moe-train checkpoint (checkpoints are folders such as "
            "RUN/checkpoints/step-00001000, or step-N.pt files of format version 2)"
        )
    if payload.get("version") != LEGACY_VERSION:
        raise CLIError(
            f"checkpoint {path} has format version {payload.get('version')}, expected "
            f"{VERSION} (a folder) or {LEGACY_VERSION} (a file)"
        )
    missing = [k for k in ("run_config", "model", "step") if k not in payload]
    if missing:
        raise CLIError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    if not tensors:
        raise CLIError(
            f"checkpoint {path} is a file of format version {LEGACY_VERSION}: its model loads "
            "(eval, generate, export, finetune), but training resumes only from folders of "
            f"version {VERSION}"
        )
    return {
        "run_config": payload["run_config"],
        "step": payload["step"],
        "model": payload["model"],
        "path": str(path),
    }


def _dcp():
    """torch.distributed.checkpoint, imported when a command writes or resumes a checkpoint, or
    reads one that moe_train.dcp_reader cannot: it imports DTensor and sympy, seconds that a
    command only reading a model (generate, eval) would wait for."""
    import torch.distributed.checkpoint as dcp

    return dcp


def _check_metadata(path: Path) -> None:
    try:
        dcp_reader.read_metadata(path)
        return
    except dcp_reader.Unfamiliar:
        pass
    try:
        _dcp().FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CLIError(f"checkpoint {path} is corrupt or truncated ({_reason(e)})") from None


def read_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The whole tensors saved under `prefix.` (e.g. the model's state dict), on this process:
    read by moe_train.dcp_reader, or by DCP itself where that reader does not know the folder
    (DCP then also words what is wrong with a damaged one)."""
    try:
        return dcp_reader.read_tensors(path, prefix)
    except dcp_reader.Unfamiliar:
        pass
    dcp = _dcp()
    reader = dcp.FileSystemReader(str(path))
    try:
        metadata = reader.read_metadata()
        state = {
            key.removeprefix(prefix + "."): torch.empty(item.size, dtype=item.properties.dtype)
            for key, item in metadata.state_dict_metadata.items()
            if key.startswith(prefix + ".") and isinstance(item, dcp.metadata.TensorStorageMetadata)
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({prefix: state}, storage_reader=reader, no_dist=True)
    except (Exception, dcp.CheckpointException) as e:
        raise CLIError(f"checkpoint {path} is corrupt or truncated ({_reason(e)})") from None
    return state


def read_rank(path: Path, rank: int) -> dict:
    """What `rank` saved of its own (data position, RNG states, model state)."""
    return _read(Path(path) / rank_file(rank))


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _reason(e: Exception) -> str:
    """The first line of an exception's message, whole (torch's go on for paragraphs)."""
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def load_newest(run_or_ckpt_dir: str | Path, on_skip=None, *, tensors: bool = True) -> dict | None:
    """The newest step checkpoint of a run that loads (None: there is none at all).

    A newer one that does not load (truncated, corrupt) is passed over: `on_skip(path, message)`
    is called for it. When none loads, the newest one's error is raised.
    """
    d = Path(run_or_ckpt_dir)
    if (d / "checkpoints").is_dir():
        d = d / "checkpoints"
    files = [path for _, path in reversed(step_files(d))]
    if not files and d.is_dir() and (legacy := _legacy_latest(d)) is not None:
        return load(legacy, tensors=tensors)
    first_error = None
    for path in files:
        try:
            return load(path, tensors=tensors)
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
    """(step, path) of the complete step checkpoints in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(run_or_ckpt_dir: str | Path) -> Path | None:
    """The newest step checkpoint of a run directory (or of its checkpoints/ directory)."""
    d = Path(run_or_ckpt_dir)
    if (d / "checkpoints").is_dir():
        d = d / "checkpoints"
    files = step_files(d)
    return files[-1][1] if files else None


def write(payload: dict, path: str | Path) -> Path:
    """A one-process checkpoint folder at `path` from a payload: its "model" state dict and
    the meta entries (run_config, step, ...); the folder appears complete or not at all."""
    path = Path(path)
    meta = {k: v for k, v in payload.items() if k not in ("model", "path")}
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_save({"format": FORMAT, "version": VERSION, **meta}, tmp / META)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _dcp().save({"model": payload["model"]}, checkpoint_id=str(tmp), no_dist=True)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


class CheckpointManager:
    """Saves step checkpoints into `ckpt_dir` from every rank, keeping the newest `keep_last` and
    `best/`. `save` is a collective when torch.distributed is initialised; with `async_save` the
    shards are written in the background and the folder completed at the next `save` or
    `finish`."""

    def __init__(self, ckpt_dir: str | Path, keep_last: int, async_save: bool = False) -> None:
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.async_save = async_save
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self._pending: tuple[Future, Path, int, bool] | None = None
        self._group = dist.new_group(backend="gloo") if async_save and self.distributed else None

    def save(
        self,
        meta: dict,
        step: int,
        *,
        tensors: dict | None = None,
        own: dict | None = None,
        is_best: bool = False,
    ) -> Path:
        """Write step `step`: `tensors` (DCP: each rank its shards; None: `meta`'s "model"
        taken out of it), `meta` (rank 0) and `own` (this rank's part)."""
        dcp = _dcp()
        if tensors is None:
            meta = dict(meta)
            tensors = {"model": meta.pop("model")}
        self.finish()
        final = self.dir / f"step-{step:08d}"
        tmp = self.dir / f"{TMP_PREFIX}{final.name}"
        if self.rank == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                raise CLIError(f"cannot write checkpoint {final} ({e.strerror or e})") from None
        _barrier(self.distributed)
        try:
            if own is not None:
                atomic_save(own, tmp / rank_file(self.rank))
            if self.rank == 0:
                atomic_save({"format": FORMAT, "version": VERSION, **meta}, tmp / META)
            if self.async_save:
                staged = torch.utils._pytree.tree_map_only(
                    torch.Tensor, lambda t: t.detach().clone(), tensors
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    future = dcp.async_save(
                        staged,
                        checkpoint_id=str(tmp),
                        process_group=self._group,
                        no_dist=not self.distributed,
                    )
                self._pending = (future, tmp, step, is_best)
                return final
            with warnings.catch_warnings():
                # DCP warns that a save without a process group is a single process's: it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not self.distributed)
        except CLIError:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        except (OSError, dcp.CheckpointException) as e:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else _reason(e)
            raise CLIError(
                f"cannot write checkpoint {final} ({reason}); the earlier checkpoints are intact"
            ) from None
        self._complete(tmp, final, is_best)
        return final

    def finish(self) -> None:
        """Complete the checkpoint an async save is writing (a no-op without one)."""
        if self._pending is None:
            return
        future, tmp, step, is_best = self._pending
        self._pending = None
        future.result()
        self._complete(tmp, self.dir / f"step-{step:08d}", is_best)

    def _complete(self, tmp: Path, final: Path, is_best: bool) -> None:
        _barrier(self.distributed)
        if self.rank == 0:
            _fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            if is_best:
                self._link_best(final)
            self._prune()
        _barrier(self.distributed)

    def _link_best(self, source: Path) -> None:
        tmp = self.dir / f"{TMP_PREFIX}best"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in source.iterdir():
            os.link(f, tmp / f.name)
        _fsync_dir(tmp)
        best, old = self.dir / "best", self.dir / f"{TMP_PREFIX}old-best"
        if best.exists():
            os.replace(best, old)
        os.replace(tmp, best)
        _fsync_dir(self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def _prune(self) -> None:
        for _, old in step_files(self.dir)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stray in self.dir.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stray, ignore_errors=True) if stray.is_dir() else stray.unlink()
