"""Reading source files with errors that name the file and what is wrong with it."""

from __future__ import annotations

import gzip
import zipfile
import zlib
from pathlib import Path

from moe_data.errors import DataError


def existing_file(path, what: str = "file") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{what} {p} does not exist")
    if p.is_dir():
        raise DataError(f"{what} {p} is a folder, not a file")
    return p.resolve()


def existing_folder(path, what: str = "folder") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise DataError(f"{what} {p} is not a folder")
    return p.resolve()


def read_bytes(path: Path) -> bytes:
    """The file's contents, gunzipped when its name ends in .gz; empty files are an error."""
    try:
        data = path.read_bytes()
    except PermissionError:
        raise DataError(f"{path} is not readable (permission denied)") from None
    except OSError as err:
        raise DataError(f"{path} could not be read: {err.strerror or err}") from None
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path} is not a valid gzip file ({err})") from None
    if not data:
        raise DataError(f"{path} is empty")
    return data


def read_zip_member(path: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if member not in names:
                raise DataError(f"{path} holds no member {member!r} (it has {names[:5]})")
            data = zf.read(member)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise DataError(f"{path} is not a valid zip file ({err})") from None
    except PermissionError:
        raise DataError(f"{path} is not readable (permission denied)") from None
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
