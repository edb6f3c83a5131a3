"""Every path the loaders open is checked to be a regular file on the opened descriptor: a FIFO
that nobody writes, a device that never ends (/dev/zero) and a folder end in one DataError
naming the path at once, for every loader and for `moe_data.load`'s specs."""

import os
import signal
import stat
import sys
from pathlib import Path

import moe_data
import pytest
from moe_data import DataError, sources

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and /dev/zero are POSIX")


@pytest.fixture(autouse=True)
def no_hang():
    """A case that blocks fails after 20 s instead of hanging the suite."""

    def fail(signum, frame):
        raise TimeoutError("the loader blocked on a special file")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def fifo(tmp: Path, name: str = "pipe.txt") -> Path:
    os.mkfifo(tmp / name)
    return tmp / name


def dev_zero(tmp: Path, name: str = "zero.txt") -> Path:
    (tmp / name).symlink_to("/dev/zero")
    return tmp / name


def folder(tmp: Path, name: str = "dir.txt") -> Path:
    (tmp / name).mkdir()
    return tmp / name


def link_to_fifo(tmp: Path, name: str = "link.txt") -> Path:
    (tmp / name).symlink_to(fifo(tmp, "pipe"))
    return tmp / name


SPECIAL = {
    "fifo": (fifo, "FIFO"),
    "/dev/zero": (dev_zero, "character device"),
    "folder": (folder, "folder"),
    "symlink to a fifo": (link_to_fifo, "FIFO"),
}
LOADERS = {
    "text": lambda p: moe_data.text(p),
    "bytes": lambda p: moe_data.text(p, level="byte"),
    "bpe": lambda p: moe_data.bpe(p, vocab_size=300),
    "bpe tokenizer": lambda p: moe_data.bpe(moe_data.default_corpus_path(), tokenizer=p),
    "enwik8": lambda p: moe_data.enwik8(p),
    "spec text:": lambda p: moe_data.load(f"text:{p}"),
    "spec bytes:": lambda p: moe_data.load(f"bytes:{p}"),
    "spec bpe:": lambda p: moe_data.load(f"bpe:{p}"),
    "load_tasks": lambda p: moe_data.load_tasks(p),
    "load_tokenizer": lambda p: moe_data.load_tokenizer(p),
    "read_text": lambda p: moe_data.read_text(p),
}


@pytest.mark.parametrize("kind", SPECIAL)
@pytest.mark.parametrize("loader", LOADERS)
def test_a_special_file_is_one_error_naming_it(tmp_path, kind, loader):
    make, word = SPECIAL[kind]
    # load_tokenizer takes a folder or a name without .json for the folder of a tokenizer.json
    path = make(tmp_path, "tok.json") if loader == "load_tokenizer" else make(tmp_path)
    if loader == "load_tokenizer" and kind == "folder":
        word = "does not exist"
    with pytest.raises(DataError, match=word) as err:
        LOADERS[loader](path)
    assert str(path) in str(err.value) or path.name in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "folder"])
@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_a_special_wikitext_split_is_one_error(tmp_path, write, kind, split):
    for name in ("train", "valid", "test"):
        if name != split:
            write(f"wt/wiki.{name}.tokens", "the cat sat\n" * 20)
    path = tmp_path / "wt" / f"wiki.{split}.tokens"
    word = SPECIAL[kind][1]
    if kind == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(DataError, match=f"wiki.{split}.tokens is .*{word}"):
        moe_data.wikitext(tmp_path / "wt")


def test_direct_dev_zero_is_refused():
    with pytest.raises(DataError, match="/dev/zero is a character device"):
        moe_data.text("/dev/zero")


def test_a_special_tokenizer_meta_file_is_one_error(tmp_path):
    vocab = moe_data.default_corpus().vocab
    path = moe_data.save_tokenizer(vocab, tmp_path / "tokenizer.json")
    meta = tmp_path / "tokenizer_meta.json"
    meta.unlink()
    os.mkfifo(meta)
    with pytest.raises(DataError, match="tokenizer_meta.json is a FIFO"):
        moe_data.load_tokenizer(path)


def test_the_check_is_on_the_opened_file(tmp_path):
    """A path that was a regular file when checked and is a FIFO when opened (swapped between
    the two) is refused by the open, without blocking."""
    path = fifo(tmp_path)
    with pytest.raises(DataError, match="FIFO"):
        sources.read_bytes(path)
    with pytest.raises(DataError, match="FIFO"):
        moe_data.cache.sha256_of(path)
    assert stat.S_ISFIFO(path.stat().st_mode)


def test_read_text_is_bounded(write):
    path = write("big.txt", "x" * 1000)
    assert moe_data.read_text(path, max_bytes=1000) == "x" * 1000
    with pytest.raises(DataError, match="big.txt holds more than 999 bytes"):
        moe_data.read_text(path, max_bytes=999)


def test_the_bound_counts_gunzipped_bytes(write):
    import gzip

    path = write("bomb.txt.gz", gzip.compress(b"x" * 100_000))
    with pytest.raises(DataError, match="bomb.txt.gz holds more than 1,000 bytes"):
        moe_data.read_text(path, max_bytes=1000)
