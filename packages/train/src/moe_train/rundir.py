"""A run folder: created with clear errors, locked while a run uses it, its history kept apart.

Lock: `DIR/.lock` holds the pid, host and start time of the process training into DIR. It is
created exclusively (O_EXCL), so of two runs started on one folder only one gets it; the other
is refused, naming the holder. A lock whose process is gone (no such pid on this host, or the pid
now belongs to a process started later) is stale and taken over. A lock written on another host
cannot be checked and is respected.

History: what a run writes (`HISTORY`). A fresh run into a folder that holds another run's
history would mix the two (metrics.jsonl appended to, old checkpoints resumed or pruned); it is
refused unless the run resumes that history or is told to overwrite it, which deletes it first.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from moe_train.errors import CLIError

LOCK = ".lock"
HISTORY = ("config.json", "metrics.jsonl", "checkpoints", "tb")
# a lock file younger than this that cannot be read yet is being written by its owner
UNREADABLE_GRACE_S = 5.0


def prepare(out_dir: Path, label: str = "--out") -> None:
    """Create `out_dir` (and its parents); a file in the way or an unwritable place is a
    CLIError naming it, after `label` (the argument it came from)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"{label} {out_dir} is a file, not a folder")
    for parent in out_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise CLIError(f"{label} {out_dir} lies under {parent}, which is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"{label} {out_dir}: cannot create the folder ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise CLIError(f"{label} {out_dir} is not writable")


def _process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[19]) if len(fields) > 19 else None


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    start = _process_start(pid)
    return holder.get("start") is None or start is None or holder["start"] == start


class RunLock:
    """The lock of one run folder; `acquire` returns a note to print when it took over a stale one."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK
        self.held = False

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _refuse_or_note(self) -> str:
        """The note for taking over the existing lock; a CLIError when its run may be live."""
        holder = self._read()
        if holder is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return ""  # released meanwhile
            if age < UNREADABLE_GRACE_S:
                raise CLIError(f"run folder {self.path.parent} is being locked by another run")
            return f"note: took over the unreadable lock file {self.path}"
        who = f"process {holder.get('pid')} on {holder.get('host')}"
        if holder.get("host") != socket.gethostname():
            raise CLIError(
                f"run folder {self.path.parent} is locked by {who} ({self.path}); if that run is "
                "over, delete the lock file"
            )
        if _alive(holder):
            raise CLIError(
                f"run folder {self.path.parent} is in use by a live run ({who}, {self.path}); "
                "wait for it to finish or choose another --out"
            )
        return f"note: took over the stale lock {self.path} of {who}, which is no longer running"

    def acquire(self) -> str | None:
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        note = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                stale = self._refuse_or_note()
                if stale:
                    note = stale
                    self.path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise CLIError(f"cannot create the lock file {self.path} ({e.strerror})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return note
        raise CLIError(f"run folder {self.path.parent}: another run keeps taking its lock")

    def release(self) -> None:
        if self.held and (self._read() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


def history(out_dir: Path) -> list[str]:
    """The parts of a run's history present in `out_dir` (empty folders do not count)."""
    found = []
    for name in HISTORY:
        path = Path(out_dir) / name
        if path.is_dir():
            if any(path.iterdir()):
                found.append(name + "/")
        elif path.exists():
            found.append(name)
    return found


def clear_history(out_dir: Path) -> list[str]:
    """Delete what `history` finds (and only that); returns what was deleted."""
    found = history(out_dir)
    for name in found:
        path = Path(out_dir) / name.rstrip("/")
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as e:
            raise CLIError(f"--overwrite: cannot delete {path} ({e.strerror})") from None
    return found
