"""The tokenised cache: reused when current, rebuilt when stale or corrupt, never wrong."""

import hashlib
import json
import logging
import os

import moe_data
import numpy as np
import pytest
from moe_data import DataError, cache

TEXT = "abcdefghij klmnop\n" * 30


@pytest.fixture
def count_builds(monkeypatch):
    """Counts calls of the build step behind the cache."""
    calls = []
    original = cache.cached

    def counting(cache_dir, name, key, sources, build):
        def wrapped():
            calls.append(name)
            return build()

        return original(cache_dir, name, key, sources, wrapped)

    monkeypatch.setattr("moe_data.datasets.cached", counting)
    return calls


def _entry(cache_dir):
    (entry,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".tmp")]
    return entry


def test_second_load_reuses_memory_mapped_entry(write, tmp_path, count_builds):
    path, store = write("t.txt", TEXT), tmp_path / "store"
    first = moe_data.text(path, cache_dir=store)
    second = moe_data.text(path, cache_dir=store)
    assert count_builds == ["t.txt-char"]
    assert isinstance(second.train, np.memmap)
    assert second.train.tolist() == first.train.tolist()
    assert second.decode(second.valid) == first.decode(first.valid)
    meta = json.loads((_entry(store) / "meta.json").read_text())
    assert meta["counts"] == {
        "train": len(first.train),
        "valid": len(first.valid),
        "test": len(first.test),
    }
    assert meta["sources"][0]["size"] == len(TEXT)


def test_changed_source_rebuilds(write, tmp_path, count_builds):
    path, store = write("t.txt", TEXT), tmp_path / "store"
    moe_data.text(path, cache_dir=store)
    path.write_text(TEXT.upper(), encoding="utf-8")
    os.utime(path, ns=(1, 1))
    again = moe_data.text(path, cache_dir=store)
    assert len(count_builds) == 2
    assert again.decode(again.train).startswith("ABCDEFGHIJ")


@pytest.mark.parametrize("where", [0, len(TEXT) // 2, len(TEXT) - 1])
def test_same_size_source_with_its_mtime_restored_rebuilds(write, tmp_path, count_builds, where):
    """What `tar x`, `cp -p` and `rsync -t` leave: other bytes, the same size and mtime."""
    path, store = write("t.txt", TEXT), tmp_path / "store"
    moe_data.text(path, cache_dir=store)
    before = path.stat()
    changed = TEXT[:where] + ("#" if TEXT[where] != "#" else "!") + TEXT[where + 1 :]
    path.write_text(changed, encoding="utf-8")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    again = moe_data.text(path, cache_dir=store)
    assert len(count_builds) == 2
    assert (
        again.decode(again.train) + again.decode(again.valid) + again.decode(again.test) == changed
    )


def test_touched_but_unchanged_source_is_reused(write, tmp_path, count_builds):
    path, store = write("t.txt", TEXT), tmp_path / "store"
    moe_data.text(path, cache_dir=store)
    os.utime(path, ns=(1, 1))
    moe_data.text(path, cache_dir=store)
    assert len(count_builds) == 1


def test_different_options_get_different_entries(write, tmp_path, count_builds):
    path, store = write("t.txt", TEXT), tmp_path / "store"
    chars = moe_data.text(path, cache_dir=store)
    raw = moe_data.text(path, "byte", cache_dir=store)
    half = moe_data.text(path, split=(0.5, 0.25, 0.25), cache_dir=store)
    assert len(count_builds) == 3
    assert chars.level == "char" and raw.level == "byte" and len(half.train) == len(TEXT) // 2


def _truncate_train(entry):
    data = (entry / "train.npy").read_bytes()
    (entry / "train.npy").write_bytes(data[: len(data) // 2])


def _garble_meta(entry):
    (entry / "meta.json").write_text("{ this is not json")


def _drop_vocab(entry):
    (entry / "vocab.json").unlink()


def _lie_about_counts(entry):
    meta = json.loads((entry / "meta.json").read_text())
    meta["counts"]["valid"] += 1
    (entry / "meta.json").write_text(json.dumps(meta))


def _wrong_dtype(entry):
    np.save(entry / "test.npy", np.zeros(3, dtype=np.float32))


def _meta_as_list(entry):
    (entry / "meta.json").write_text("[1, 2, 3]")


def _meta_checksum_edited(entry):
    meta = json.loads((entry / "meta.json").read_text())
    meta["blake2b"]["valid.npy"] = "0" * 64
    (entry / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage",
    [
        _truncate_train,
        _garble_meta,
        _meta_as_list,
        _meta_checksum_edited,
        _drop_vocab,
        _lie_about_counts,
        _wrong_dtype,
    ],
)
def test_corrupt_entry_is_rebuilt(write, tmp_path, count_builds, damage):
    path, store = write("t.txt", TEXT), tmp_path / "store"
    clean = moe_data.text(path, cache_dir=store)
    expected = {s: clean.split(s).tolist() for s in ("train", "valid", "test")}
    damage(_entry(store))
    rebuilt = moe_data.text(path, cache_dir=store)
    assert len(count_builds) == 2
    assert {s: rebuilt.split(s).tolist() for s in ("train", "valid", "test")} == expected
    assert moe_data.text(path, cache_dir=store).train.tolist() == expected["train"]
    assert len(count_builds) == 2


def test_cache_off_and_unwritable(write):
    path = write("t.txt", TEXT)
    off = moe_data.text(path, cache_dir=False)
    assert not isinstance(off.train, np.memmap)
    blocker = write("blocker", "a file where the cache folder should be")
    fallback = moe_data.text(path, cache_dir=blocker / "sub")
    assert fallback.train.tolist() == off.train.tolist()


def test_default_cache_dir_follows_environment(private_cache, write, monkeypatch):
    assert moe_data.default_cache_dir() == private_cache
    moe_data.text(write("t.txt", TEXT))
    assert any(private_cache.iterdir())
    monkeypatch.delenv("MOE_DATA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert str(moe_data.default_cache_dir()) == "/somewhere/moe-data"


def test_cached_word_and_bpe_vocabularies_survive(tmp_path, write):
    folder = tmp_path / "wt"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"wiki.{split}.tokens").write_text(" a b c \n\n b <unk> \n", encoding="utf-8")
    first, second = moe_data.wikitext(folder), moe_data.wikitext(folder)
    assert second.vocab.words == first.vocab.words
    path = write("b.txt", TEXT * 5)
    b1, b2 = moe_data.bpe(path, vocab_size=280), moe_data.bpe(path, vocab_size=280)
    assert b2.encode("abc klm").tolist() == b1.encode("abc klm").tolist()
    assert b2.train.tolist() == b1.train.tolist()


def test_entry_stored_by_another_process_meanwhile_is_kept(write, tmp_path):
    path, store = write("t.txt", TEXT), tmp_path / "store"
    vocab = moe_data.CharVocab("".join(sorted(set(TEXT))))
    ids = vocab.encode(TEXT)
    arrays = {"train": ids[:400], "valid": ids[400:450], "test": ids[450:]}
    key = {"kind": "race"}

    def build_while_another_rank_stores():
        cache.cached(store, "race", key, [path], lambda: (vocab, arrays))
        return vocab, {s: a[::-1].copy() for s, a in arrays.items()}

    _, got = cache.cached(store, "race", key, [path], build_while_another_rank_stores)
    assert isinstance(got["train"], np.memmap)
    assert got["train"].tolist() == arrays["train"].tolist()
    assert [p.name for p in store.iterdir() if p.name.startswith(".tmp")] == []


def _npy_payload_offset(path) -> int:
    """Where the array's bytes start in a .npy file (after its header)."""
    arr = np.load(path, mmap_mode="r")
    return path.stat().st_size - arr.nbytes


def _reversed_ids(entry):
    """Same size, a valid header and every id in range: only a checksum tells."""
    arr = np.load(entry / "train.npy")
    np.save(entry / "train.npy", np.ascontiguousarray(arr[::-1]))
    return "train.npy"


def _random_bytes(entry):
    path = entry / "valid.npy"
    data = bytearray(path.read_bytes())
    start = _npy_payload_offset(path)
    data[start:] = np.random.default_rng(0).integers(0, 256, len(data) - start, np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return "valid.npy"


def _swapped_vocabulary(entry):
    """Another vocabulary of the same size: every id would decode to the wrong character."""
    data = json.loads((entry / "vocab.json").read_text())
    data["chars"] = "".join(sorted(data["chars"].upper() + "#"))[: len(data["chars"])]
    (entry / "vocab.json").write_text(json.dumps(data))
    return "vocab.json"


@pytest.mark.parametrize("overwrite", [_reversed_ids, _random_bytes, _swapped_vocabulary])
def test_same_size_overwrite_is_caught_and_rebuilt(
    write, tmp_path, count_builds, caplog, overwrite
):
    path, store = write("t.txt", TEXT), tmp_path / "store"
    clean = moe_data.text(path, cache_dir=store)
    expected = {s: clean.decode(clean.split(s)) for s in ("train", "valid", "test")}
    entry = _entry(store)
    sizes = {p.name: p.stat().st_size for p in entry.iterdir()}
    name = overwrite(entry)
    assert {p.name: p.stat().st_size for p in entry.iterdir()} == sizes
    with caplog.at_level(logging.WARNING, logger="moe_data"):
        rebuilt = moe_data.text(path, cache_dir=store)
    assert len(count_builds) == 2
    assert {s: rebuilt.decode(rebuilt.split(s)) for s in ("train", "valid", "test")} == expected
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(entry / name) in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


def test_corrupt_meta_warns_naming_it(write, tmp_path, caplog):
    path, store = write("t.txt", TEXT), tmp_path / "store"
    moe_data.text(path, cache_dir=store)
    _garble_meta(_entry(store))
    with caplog.at_level(logging.WARNING, logger="moe_data"):
        moe_data.text(path, cache_dir=store)
    assert str(_entry(store) / "meta.json") in caplog.text


def test_checksums_are_those_of_the_files(write, tmp_path):
    path, store = write("t.txt", TEXT), tmp_path / "store"
    moe_data.text(path, cache_dir=store)
    entry = _entry(store)
    meta = json.loads((entry / "meta.json").read_text())
    for name in ("vocab.json", "train.npy", "valid.npy", "test.npy"):
        digest = hashlib.blake2b((entry / name).read_bytes(), digest_size=32).hexdigest()
        assert meta["blake2b"][name] == digest


def test_out_of_range_ids_in_an_intact_entry_name_the_file(write, tmp_path):
    path, store = write("t.txt", TEXT), tmp_path / "store"
    corpus = moe_data.text(path, cache_dir=store)
    entry = _entry(store)
    bad = np.asarray(corpus.test).copy()
    bad[3] = corpus.vocab_size  # one past the last id, with checksums that agree
    np.save(entry / "test.npy", bad)
    meta = json.loads((entry / "meta.json").read_text())
    meta["blake2b"]["test.npy"] = hashlib.blake2b(
        (entry / "test.npy").read_bytes(), digest_size=32
    ).hexdigest()
    (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as err:
        moe_data.text(path, cache_dir=store)
    message = str(err.value)
    assert str(entry / "test.npy") in message and f"token id {corpus.vocab_size}" in message
    assert "\n" not in message


def test_entry_of_the_previous_format_is_rebuilt(write, tmp_path, count_builds):
    path, store = write("t.txt", TEXT), tmp_path / "store"
    clean = moe_data.text(path, cache_dir=store)
    entry = _entry(store)
    meta = json.loads((entry / "meta.json").read_text())
    meta["format"] = 1
    (entry / "meta.json").write_text(json.dumps(meta))
    assert moe_data.text(path, cache_dir=store).train.tolist() == clean.train.tolist()
    assert len(count_builds) == 2
