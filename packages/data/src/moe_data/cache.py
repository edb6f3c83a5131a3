"""The tokenised cache: each corpus is encoded once into memory-mapped .npy files.

An entry is a folder `<name>-<digest of the key>/` holding `train.npy`, `valid.npy`, `test.npy`,
`vocab.json` and `meta.json` (format version, the key, each source file's path, size and
SHA-256, the BLAKE2b checksum of each of the other four files, the dtype, the token counts and
the vocabulary size). An entry is reused only when all of it reads back and matches; a source
whose size or SHA-256 no longer matches makes the entry stale (the contents are hashed at each
load: a modification time can be restored, by `tar x`, `cp -p` or `rsync -t`). A stale or corrupt entry is rebuilt, a corrupt one with
a warning on stderr (through the "moe_data" logger) that names the damaged file. A token id
outside the vocabulary in an entry whose checksums match raises DataError naming the file.
Entries are written into a temporary folder and renamed into place, so a reader never sees half
an entry, and ranks that build the same entry at once do not clash.

Verifying costs one read of every source and of every file of the entry at each load (SHA-256
and BLAKE2b run at several hundred MB/s to about 2 GB/s, in 4 MiB chunks, so a corpus of a few
hundred MB takes a second or two, mostly from the page cache), and one more pass over the
memory-mapped arrays for the id range.

Where: `cache_dir` if given, else $MOE_DATA_CACHE, else $XDG_CACHE_HOME/moe-data, else
~/.cache/moe-data. `cache_dir=False` turns caching off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from moe_data.errors import DataError
from moe_data.sources import open_regular
from moe_data.vocab import check_ids, vocab_from_json

FORMAT = 2
SPLITS = ("train", "valid", "test")
CHECKED_FILES = ("vocab.json", *(f"{split}.npy" for split in SPLITS))
log = logging.getLogger("moe_data")


def default_cache_dir() -> Path:
    if os.environ.get("MOE_DATA_CACHE"):
        return Path(os.environ["MOE_DATA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe-data"


def _digest(path: Path, h, what: str = "file") -> str:
    with open_regular(path, what) as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def sha256_of(path: Path, what: str = "file") -> str:
    return _digest(path, hashlib.sha256(), what)


def blake2b_of(path: Path) -> str:
    return _digest(path, hashlib.blake2b(digest_size=32))


def describe_source(path: Path) -> dict:
    """What meta.json records of a source; its SHA-256 is what a later load compares."""
    return {"path": str(path), "size": path.stat().st_size, "sha256": sha256_of(path, "source")}


def _source_unchanged(recorded: dict) -> bool:
    """Whether the source holds the bytes the entry was built from. The size decides at once
    when it differs; otherwise the contents are hashed: size and modification time alone would
    miss same-size text whose mtime was restored (tar x, cp -p, rsync -t)."""
    path = Path(recorded["path"])
    try:
        if path.stat().st_size != recorded["size"]:
            return False
        return sha256_of(path, "source") == recorded["sha256"]
    except (OSError, DataError):
        return False


def _entry_dir(root: Path, name: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]
    return root / f"{safe}-{digest}"


def read_entry(entry: Path, key: dict, *, warn: bool = True):
    """(vocab, {split: memmap}) when the entry is complete, current and intact, else None.

    Raises DataError when an intact entry holds a token id outside its vocabulary.
    """
    report = log.warning if warn else log.info
    if not entry.exists():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        report(
            "moe-data cache file %s is unreadable (%s); rebuilding the entry",
            entry / "meta.json",
            err,
        )
        return None
    try:
        if meta.get("format") != FORMAT or meta.get("key") != key:
            log.info("moe-data cache %s was written for another format or key; rebuilding", entry)
            return None
        if not all(_source_unchanged(s) for s in meta["sources"]):
            log.info("moe-data cache %s is stale: a source changed", entry)
            return None
        for name in CHECKED_FILES:
            if blake2b_of(entry / name) != meta["blake2b"][name]:
                report(
                    "moe-data cache file %s does not match its checksum in meta.json; rebuilding the entry",
                    entry / name,
                )
                return None
        vocab = vocab_from_json(json.loads((entry / "vocab.json").read_text()))
        if vocab.size != meta["vocab_size"]:
            raise ValueError(
                f"vocab.json holds {vocab.size} tokens, meta.json says {meta['vocab_size']}"
            )
        arrays = {}
        for split in SPLITS:
            arr = np.load(entry / f"{split}.npy", mmap_mode="r", allow_pickle=False)
            if (
                arr.ndim != 1
                or arr.dtype != np.dtype(meta["dtype"])
                or len(arr) != meta["counts"][split]
            ):
                raise ValueError(f"{split}.npy does not have the shape and dtype meta.json gives")
            arrays[split] = arr
    except (OSError, ValueError, KeyError, TypeError, EOFError, DataError) as err:
        report("moe-data cache %s is unreadable (%s); rebuilding the entry", entry, err)
        return None
    try:
        for split, arr in arrays.items():
            check_ids(arr, vocab.size, entry / f"{split}.npy")
    except DataError as err:
        raise DataError(f"{err}; delete {entry} to have it rebuilt") from None
    return vocab, arrays


def _write_entry(tmp: Path, key: dict, sources: list[dict], vocab, arrays: dict) -> None:
    dtype = vocab.dtype
    for split in SPLITS:
        np.save(tmp / f"{split}.npy", np.ascontiguousarray(arrays[split], dtype=dtype))
    (tmp / "vocab.json").write_text(json.dumps(vocab.to_json()))
    meta = {
        "format": FORMAT,
        "key": key,
        "sources": sources,
        "blake2b": {name: blake2b_of(tmp / name) for name in CHECKED_FILES},
        "dtype": dtype.str,
        "counts": {split: int(len(arrays[split])) for split in SPLITS},
        "vocab_size": vocab.size,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def cached(
    cache_dir,
    name: str,
    key: dict,
    sources: list[Path],
    build: Callable[[], tuple[object, dict]],
):
    """Return (vocab, {split: 1-D array}) from the cache, building and storing it when needed.

    `key` holds everything besides the source contents that decides the tokens (kind, level,
    split, tokenizer options); `sources` are the files whose contents do.
    """
    if cache_dir is False:
        return build()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # through JSON once, so that tuples compare equal to what meta.json gives back
    key = json.loads(json.dumps({**key, "sources": [str(p) for p in sources]}))
    entry = _entry_dir(root, name, key)
    found = read_entry(entry, key)
    if found is not None:
        return found
    described = [describe_source(p) for p in sources]
    vocab, arrays = build()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=root))
    except OSError as err:
        log.warning("moe-data cache %s is not writable (%s); not caching", root, err)
        return vocab, arrays
    try:
        _write_entry(tmp, key, described, vocab, arrays)
        if entry.exists():
            # another process (a data-parallel rank) may have stored it meanwhile
            if (found := read_entry(entry, key, warn=False)) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return found
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    except OSError as err:
        log.info("moe-data cache %s was not stored (%s)", entry, err)
        shutil.rmtree(tmp, ignore_errors=True)
    return read_entry(entry, key, warn=False) or (vocab, arrays)
