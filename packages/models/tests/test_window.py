"""moe_models.window: appending in place gives the rows concatenation gives, and never changes
the rows of a window still held (a state read twice)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_models.window import Window, extend


def reference(rows: torch.Tensor | None, new: torch.Tensor, keep: int | None):
    """(rows of this call, kept rows for the next): concatenation and slicing."""
    both = new if rows is None else torch.cat([rows, new], dim=1)
    return both, both if keep is None else both[:, both.shape[1] - min(keep, both.shape[1]) :]


@settings(max_examples=25)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=12),
    keep=st.one_of(st.none(), st.integers(0, 20)),
    branch_at=st.integers(0, 11),
    seed=st.integers(0, 2**16),
)
def test_extend_equals_concatenation_and_branches_do_not_clobber(lengths, keep, branch_at, seed):
    g = torch.Generator().manual_seed(seed)
    window, ref = None, None
    held = []  # (window, its rows then) of every step, read again at the end
    for i, n in enumerate(lengths):
        new = torch.randn(2, n, 3, generator=g)
        rows, window = extend(window, new, keep)
        want_rows, ref = reference(ref, new, keep)
        assert torch.equal(rows, want_rows)
        assert torch.equal(window.rows(), ref)
        held.append((window, ref.clone()))
        if i == branch_at:
            # second continuations of this state and of the one before: their own rows, and
            # both they and the first continuation (the next step) keep theirs
            for w, w_rows in held[-2:]:
                other = torch.randn(2, 2, 3, generator=g)
                branch_rows, branch = extend(w, other, keep)
                want_rows, want_kept = reference(w_rows, other, keep)
                assert torch.equal(branch_rows, want_rows)
                held.append((branch, want_kept))
    for w, rows_then in held:
        assert torch.equal(w.rows(), rows_then)


def test_a_step_writes_in_place_and_reallocates_only_when_full():
    window, buffers = None, set()
    for _ in range(200):
        _, window = extend(window, torch.ones(1, 1, 4), keep=32)
        buffers.add(window.buf.data_ptr())
    # a buffer holds 32 kept rows and 32 of room: one per 32 steps, not one per step
    assert len(buffers) <= 200 // 32 + 1


def test_windows_are_pytree_nodes_batch_reordered_like_tensors():
    _, window = extend(None, torch.arange(6.0).view(3, 2, 1), keep=None)
    moved = torch.utils._pytree.tree_map_only(
        torch.Tensor, lambda t: t.index_select(0, torch.tensor([2, 0])), [window]
    )[0]
    assert isinstance(moved, Window) and moved.rows()[:, :, 0].tolist() == [[4, 5], [0, 1]]
    rows, _ = extend(moved, torch.full((2, 1, 1), 9.0), keep=None)
    assert rows[:, :, 0].tolist() == [[4, 5, 9], [0, 1, 9]]
    assert window.rows()[:, :, 0].tolist() == [[0, 1], [2, 3], [4, 5]]


def test_under_autograd_rows_are_concatenated_and_differentiable():
    new = torch.randn(2, 3, 4, requires_grad=True)
    rows, window = extend(None, new, keep=2)
    rows2, _ = extend(window, new * 2, keep=2)
    rows2.sum().backward()
    # rows2 = the last 2 rows of `new` and 2 * new: d/dnew = 1 for the kept rows, + 2 for all
    assert new.grad[:, 0].eq(2).all() and new.grad[:, 1:].eq(3).all()
    assert torch.equal(rows, new)
