"""The tokenised cache: reused when current, rebuilt when stale or corrupt, never wrong."""

import json
import os

import moe_data
import numpy as np
import pytest
from moe_data import cache

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


@pytest.mark.parametrize(
    "damage", [_truncate_train, _garble_meta, _drop_vocab, _lie_about_counts, _wrong_dtype]
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
