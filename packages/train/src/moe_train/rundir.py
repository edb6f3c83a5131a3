"""A run folder: created with clear errors, locked while a run uses it, its history kept apart.

Lock: `DIR/.lock` holds the pid, host and start time of the process training into DIR, and that
process holds a `flock` on it, so of two runs started on one folder only one gets it (also when
both find a stale lock at once); the other is refused, naming the holder. A lock whose process is
gone (the flock went with it; no such pid on this host, or the pid now belongs to a process
started later) is stale and taken over. A lock written on another host cannot be checked and is
respected.

History: what a run writes (`HISTORY`). A fresh run into a folder that holds another run's
history would mix the two (metrics.jsonl appended to, old checkpoints resumed or pruned); it is
refused unless the run resumes that history or is told to overwrite it, which deletes it first.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from moe_train.errors import CLIError

LOCK = ".lock"
HISTORY = ("config.json", "metrics.jsonl", "checkpoints", "tb")


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
    """The lock of one run folder; `acquire` returns a note to print when it took over a stale one.

    The exclusion is the kernel's: `flock` on the open lock file, held until `release` (or until
    the process ends, however it ends). A process that finds the lock file holds the flock only
    once nobody else does, then checks that the path still names the file it locked (a releaser
    may have deleted it meanwhile), so of several processes taking over one stale lock exactly
    one succeeds. The JSON inside says who holds it, for the messages and for hosts the flock
    does not reach (a lock written on another host is respected).
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK
        self.held = False
        self._fd: int | None = None

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _busy(self, holder: dict | None) -> CLIError:
        if holder is None:
            return CLIError(f"run folder {self.path.parent} is being locked by another run")
        who = f"process {holder.get('pid')} on {holder.get('host')}"
        return CLIError(
            f"run folder {self.path.parent} is in use by a live run ({who}, {self.path}); "
            "wait for it to finish or choose another --out"
        )

    def _refuse_or_note(self, holder: dict | None) -> str | None:
        """With the flock held: the note for taking over what the file says; a CLIError when its
        run may be live (another host's, or one that locked without flock)."""
        if holder is None:
            return None
        who = f"process {holder.get('pid')} on {holder.get('host')}"
        if holder.get("host") != socket.gethostname():
            raise CLIError(
                f"run folder {self.path.parent} is locked by {who} ({self.path}); if that run is "
                "over, delete the lock file"
            )
        if _alive(holder):
            raise self._busy(holder)
        return f"note: took over the stale lock {self.path} of {who}, which is no longer running"

    def _open_locked(self) -> int | None:
        """A descriptor of the lock file with the flock held, or None when the path was replaced
        while waiting (try again). A CLIError when another process holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CLIError(f"cannot create the lock file {self.path} ({e.strerror})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(self._read()) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    def acquire(self) -> str | None:
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(10):
            fd = self._open_locked()
            if fd is None:
                continue
            try:
                note = self._refuse_or_note(self._read())
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
            except OSError as e:
                os.close(fd)
                raise CLIError(f"cannot write the lock file {self.path} ({e.strerror})") from None
            except BaseException:
                os.close(fd)
                raise
            self._fd, self.held = fd, True
            return note
        raise CLIError(f"run folder {self.path.parent}: another run keeps taking its lock")

    def release(self) -> None:
        """Delete the lock file, then drop the flock (in that order: a process waiting on the
        old file then sees that it is gone and locks the new one)."""
        if self._fd is not None:
            try:
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    self.path.unlink()
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        self.held = False


def edited_config_note(out_dir: Path, saved: dict) -> str | None:
    """A note when DIR/config.json no longer says what the checkpoint's config does (edited by
    hand): --resume continues the checkpoint's config and writes config.json again."""
    path = Path(out_dir) / "config.json"
    try:
        written = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        written = None
    if written == json.loads(json.dumps(saved)):
        return None
    return (
        f"note: {path} differs from the config in the checkpoint (edited?); --resume continues "
        "the checkpoint's and rewrites the file: change training fields with flags or "
        "train.KEY=VALUE instead"
    )


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
