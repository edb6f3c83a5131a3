"""Batching invariants, checked on streams of distinct tokens (token value = position)."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from moe_data import RandomWindowBatcher, XLBatcher


@st.composite
def xl_setups(draw):
    world_size = draw(st.integers(1, 3))
    batch_size = draw(st.integers(1, 4))
    seq_len = draw(st.integers(1, 9))
    streams = batch_size * world_size
    n = draw(st.integers(max(streams + 1, seq_len + 1), 160))
    return n, batch_size, seq_len, world_size, draw(st.booleans())


def positions(n, dtype=np.uint16):
    return np.arange(n, dtype=dtype)


def xl_ranks(n, batch_size, seq_len, world_size, drop_last=False):
    return [
        XLBatcher(
            positions(n), batch_size, seq_len, rank=r, world_size=world_size, drop_last=drop_last
        )
        for r in range(world_size)
    ]


@given(xl_setups())
def test_xl_epoch_covers_each_token_once_across_ranks(setup):
    n, batch_size, seq_len, world_size, _ = setup
    seen = []
    for batcher in xl_ranks(n, batch_size, seq_len, world_size):
        batches = list(batcher)
        assert len(batches) == len(batcher)
        for inputs, targets in batches:
            assert inputs.dtype == np.int64 and targets.dtype == np.int64
            assert inputs.shape[0] == batch_size and 1 <= inputs.shape[1] <= seq_len
            np.testing.assert_array_equal(targets, inputs + 1)
            seen.append(inputs.ravel())
    seen = np.sort(np.concatenate(seen))
    streams = batch_size * world_size
    covered = streams * ((n - 1) // streams)
    np.testing.assert_array_equal(seen, np.arange(covered))
    assert n - 1 - covered < streams


@given(xl_setups())
def test_xl_rows_continue_across_batches(setup):
    n, batch_size, seq_len, world_size, drop_last = setup
    assume(not drop_last or (n - 1) // (batch_size * world_size) >= seq_len)
    for batcher in xl_ranks(n, batch_size, seq_len, world_size, drop_last):
        batches = list(batcher)
        for (prev, _), (nxt, _) in zip(batches, batches[1:], strict=False):
            np.testing.assert_array_equal(nxt[:, 0], prev[:, -1] + 1)
            assert prev.shape[1] == seq_len
        if drop_last:
            assert all(b[0].shape[1] == seq_len for b in batches)


@given(xl_setups())
def test_xl_ranks_are_disjoint(setup):
    n, batch_size, seq_len, world_size, drop_last = setup
    assume(not drop_last or (n - 1) // (batch_size * world_size) >= seq_len)
    sets = [
        {int(t) for inputs, _ in batcher for t in inputs.ravel()}
        for batcher in xl_ranks(n, batch_size, seq_len, world_size, drop_last)
    ]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j]


@given(xl_setups(), st.integers(0, 40))
def test_xl_resume_reproduces_batches(setup, stop):
    n, batch_size, seq_len, world_size, _ = setup
    batcher = XLBatcher(
        positions(n), batch_size, seq_len, world_size=world_size, rank=world_size - 1
    )
    reference = list(batcher) + list(batcher)
    assert batcher.state_dict() == {"epoch": 2, "position": 0}
    stop = min(stop, len(reference))
    fresh = XLBatcher(positions(n), batch_size, seq_len, world_size=world_size, rank=world_size - 1)
    consumed = []
    while len(consumed) < stop:
        consumed.extend(b for _, b in zip(range(stop - len(consumed)), fresh, strict=False))
    state = fresh.state_dict()
    resumed = XLBatcher(
        positions(n), batch_size, seq_len, world_size=world_size, rank=world_size - 1
    )
    resumed.load_state_dict(state)
    rest = []
    while len(consumed) + len(rest) < len(reference):
        rest.extend(resumed)
    for (a, _), (b, _) in zip(reference, consumed + rest, strict=True):
        np.testing.assert_array_equal(a, b)


def test_xl_single_token_segments_and_memmap(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, positions(11))
    batcher = XLBatcher(np.load(path, mmap_mode="r"), 2, 1)
    inputs = [x for x, _ in batcher]
    assert (
        len(inputs) == 5 and inputs[0].tolist() == [[0], [5]] and inputs[-1].tolist() == [[4], [9]]
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"seq_len": -1}, "seq_len"),
        ({"seq_len": 20}, "seq_len=20 is longer than the data"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"world_size": 0}, "world_size"),
        ({"batch_size": 10}, "10 streams need at least 11 tokens"),
    ],
)
@pytest.mark.parametrize("cls", [XLBatcher, RandomWindowBatcher])
def test_bad_arguments(cls, kwargs, message):
    args = {"batch_size": 2, "seq_len": 3, **kwargs}
    if cls is RandomWindowBatcher and "streams" in message:
        message = "fewer than batch_size"
    with pytest.raises(ValueError, match=message):
        cls(positions(10), args.pop("batch_size"), args.pop("seq_len"), **args)


def test_drop_last_with_streams_shorter_than_seq_len():
    with pytest.raises(ValueError, match="drop_last leaves no batch"):
        XLBatcher(positions(10), 3, 4, drop_last=True)
    assert len(XLBatcher(positions(10), 3, 4)) == 1


def test_bad_tokens_and_states():
    with pytest.raises(ValueError, match="1-D integer"):
        XLBatcher(np.zeros((4, 4), dtype=np.int64), 1, 2)
    with pytest.raises(ValueError, match="1-D integer"):
        RandomWindowBatcher(np.zeros(40, dtype=np.float32), 1, 2)
    batcher = XLBatcher(positions(40), 2, 3)
    with pytest.raises(ValueError, match="position 99"):
        batcher.load_state_dict({"epoch": 0, "position": 99})
    with pytest.raises(ValueError, match="keys"):
        batcher.load_state_dict({"step": 1})
    windows = RandomWindowBatcher(positions(40), 2, 3, seed=1)
    with pytest.raises(ValueError, match="seed 2"):
        windows.load_state_dict({"epoch": 0, "position": 0, "seed": 2})


@st.composite
def window_setups(draw):
    world_size = draw(st.integers(1, 3))
    batch_size = draw(st.integers(1, 3))
    seq_len = draw(st.integers(1, 8))
    n = draw(st.integers((batch_size * world_size + 1) * seq_len, 200))
    return n, batch_size, seq_len, world_size, draw(st.integers(0, 2**31))


@given(window_setups())
def test_windows_are_slices_of_the_stream(setup):
    n, batch_size, seq_len, world_size, seed = setup
    batcher = RandomWindowBatcher(
        positions(n), batch_size, seq_len, seed=seed, world_size=world_size
    )
    for _ in range(batcher.steps_per_epoch + 1):
        inputs, targets = next(batcher)
        assert inputs.shape == targets.shape == (batch_size, seq_len)
        assert inputs.dtype == np.int64
        np.testing.assert_array_equal(inputs, inputs[:, :1] + np.arange(seq_len))
        np.testing.assert_array_equal(targets, inputs + 1)
        assert targets.max() < n


@given(window_setups())
def test_windows_ranks_disjoint_and_each_used_once_per_epoch(setup):
    n, batch_size, seq_len, world_size, seed = setup
    ranks = [
        RandomWindowBatcher(
            positions(n), batch_size, seq_len, seed=seed, rank=r, world_size=world_size
        )
        for r in range(world_size)
    ]
    for _epoch in range(2):
        tokens = [
            np.concatenate([next(b)[0].ravel() for _ in range(b.steps_per_epoch)]) for b in ranks
        ]
        everything = np.concatenate(tokens)
        assert len(np.unique(everything)) == len(everything)
        assert len(everything) == ranks[0].steps_per_epoch * batch_size * world_size * seq_len


@given(window_setups(), st.integers(0, 30))
def test_windows_deterministic_and_resumable(setup, stop):
    n, batch_size, seq_len, world_size, seed = setup
    make = lambda: RandomWindowBatcher(
        positions(n), batch_size, seq_len, seed=seed, world_size=world_size
    )
    reference = [next(b) for b in [make()] for _ in range(stop + 5)]
    again = make()
    head = [next(again) for _ in range(stop)]
    resumed = make()
    resumed.load_state_dict(again.state_dict())
    tail = [next(resumed) for _ in range(5)]
    for (a, _), (b, _) in zip(reference, head + tail, strict=True):
        np.testing.assert_array_equal(a, b)


def test_windows_depend_on_seed_and_epoch():
    data = positions(4000)
    a = RandomWindowBatcher(data, 4, 16, seed=0)
    b = RandomWindowBatcher(data, 4, 16, seed=1)
    assert not np.array_equal(next(a)[0], next(b)[0])
    first_epoch = np.stack([next(a)[0] for _ in range(a.steps_per_epoch - 1)])
    second_epoch = np.stack([next(a)[0] for _ in range(a.steps_per_epoch - 1)])
    assert not np.array_equal(first_epoch, second_epoch)
