"""Reading source files with errors that name the file and what is wrong with it."""

from __future__ import annotations

import gzip
import os
import stat
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

from moe_data.errors import DataError

_NOT_REGULAR = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_regular(mode: int, p: Path, what: str) -> None:
    """A one-line DataError unless `mode` is a regular file's: reading a FIFO nobody writes
    blocks forever, and a device such as /dev/zero never ends."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise DataError(f"{what} {p} is a folder, not a file")
    kind = next((name for test, name in _NOT_REGULAR if test(mode)), "a special file")
    raise DataError(f"{what} {p} is {kind}, not a regular file")


def _os_error(err: OSError, p: Path, what: str) -> DataError:
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        return DataError(f"{what} {p} does not exist")
    if isinstance(err, PermissionError):
        return DataError(f"{what} {p} is not readable (permission denied)")
    return DataError(f"{what} {p} could not be read: {err.strerror or err}")


def existing_file(path, what: str = "file") -> Path:
    """The resolved path of a regular file, or a DataError naming `what` is wrong with it."""
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except OSError as err:
        raise _os_error(err, p, what) from None
    _check_regular(mode, p, what)
    return p.resolve()


def existing_folder(path, what: str = "folder") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise DataError(f"{what} {p} is not a folder")
    return p.resolve()


def open_regular(path, what: str = "file") -> BinaryIO:
    """`path` opened for reading in binary, checked to be a regular file on the opened
    descriptor itself (so a path swapped for a FIFO after an earlier check cannot block): the
    open does not wait for a FIFO's writer, and the check comes before any read."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise _os_error(err, p, what) from None
    try:
        _check_regular(os.fstat(fd).st_mode, p, what)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_at_most(f, limit: int | None, path: Path, what: str) -> bytes:
    if limit is None:
        return f.read()
    data = f.read(limit + 1)
    if len(data) > limit:
        raise DataError(f"{what} {path} holds more than {limit:,} bytes, the most read here")
    return data


def read_bytes(path: Path, what: str = "file", max_bytes: int | None = None) -> bytes:
    """The file's contents, gunzipped when its name ends in .gz; empty files are an error, and
    so are (with `max_bytes`) more than `max_bytes` bytes, counted after gunzipping."""
    with open_regular(path, what) as f:
        try:
            if path.suffix != ".gz":
                data = _read_at_most(f, max_bytes, path, what)
            else:
                with gzip.GzipFile(fileobj=f) as gz:
                    data = _read_at_most(gz, max_bytes, path, what)
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise DataError(f"{path} is not a valid gzip file ({err})") from None
        except OSError as err:
            raise _os_error(err, path, what) from None
    if not data:
        raise DataError(f"{path} is empty")
    return data


def read_zip_member(path: Path, member: str) -> bytes:
    try:
        with open_regular(path, "zip file") as f, zipfile.ZipFile(f) as zf:
            names = zf.namelist()
            if member not in names:
                raise DataError(f"{path} holds no member {member!r} (it has {names[:5]})")
            data = zf.read(member)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise DataError(f"{path} is not a valid zip file ({err})") from None
    except OSError as err:
        raise _os_error(err, path, "zip file") from None
    if not data:
        raise DataError(f"{path}: member {member!r} is empty")
    return data


def decode_utf8(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (invalid byte {data[err.start]:#04x} at offset {err.start});"
            " use the byte level (bytes:PATH) for binary data"
        ) from None


def read_text(path, what: str = "text file", max_bytes: int | None = None) -> str:
    """A UTF-8 text file (gunzipped when it ends in .gz) as a string, read once: DataError
    naming the file when it is missing, no regular file, empty, not UTF-8 or (with
    `max_bytes`) larger than that."""
    src = existing_file(path, what)
    return decode_utf8(read_bytes(src, what, max_bytes), src)


def universal_lines(text: str, keepends: bool = False) -> list[str]:
    """Lines as Python's text-mode file iteration gives them (\\r\\n and \\r are newlines too),
    with their "\\n" when `keepends`."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    last = lines.pop()
    if keepends:
        lines = [line + "\n" for line in lines]
    if last:
        lines.append(last)
    return lines
