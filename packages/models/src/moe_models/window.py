"""The growing state of generation, appended in place: `Window`, the last rows of a stream.

A decoding step adds a row (a token's keys and values, its layer input, its id) to what the
earlier steps left. Concatenating copies everything at every step; a Window preallocates room and
writes the new rows after the old ones, so a step copies its new rows only (and, once per as many
steps as the window keeps, the kept rows into a fresh buffer).

A state may be read again after the call that extended it (a search that branches, a caller that
retries): a call writes in place only when no call has written past the window's end since, else
it copies the window into a new buffer. Rows a live window covers are never overwritten.
Windows are pytree nodes (their buffer the one leaf), so `tree_map` over a state reorders,
detaches or moves them as it does plain tensors.

Under autograd (the new rows require grad) the rows are concatenated instead: in-place writes
would change tensors the backward pass saved.
"""

from __future__ import annotations

import torch
from torch import Tensor

# rows of headroom at least, so that a one-token window does not reallocate every few steps
MIN_HEADROOM = 16


class Window:
    """Rows [start, end) along dim 1 of buf [B, capacity, ...]; `frontier` (shared by the windows
    of one buffer) holds the end of what has been written to buf."""

    def __init__(self, buf: Tensor, start: int, end: int, frontier: list[int]) -> None:
        self.buf, self.start, self.end, self.frontier = buf, start, end, frontier

    @classmethod
    def of(cls, rows: Tensor) -> Window:
        """A window of all of rows [B, n, ...], without a copy (the next extend copies them)."""
        return cls(rows, 0, rows.shape[1], [rows.shape[1]])

    def __len__(self) -> int:
        return self.end - self.start

    def rows(self) -> Tensor:
        return self.buf[:, self.start : self.end]


def extend(window: Window | None, new_BL: Tensor, keep: int | None) -> tuple[Tensor, Window]:
    """(rows, next): rows [B, n + L, ...] are the window's n rows followed by new_BL [B, L, ...]
    (a view of the buffer); next, the window of the last `keep` of them (None: all) for the next
    call. window None: no rows yet."""
    old = 0 if window is None else len(window)
    total = old + new_BL.shape[1]
    kept = total if keep is None else min(keep, total)
    if old == 0:
        # the first rows (a prompt): kept as they are, copied into room by the next call
        return new_BL, Window(new_BL, total - kept, total, [total])
    if new_BL.requires_grad and torch.is_grad_enabled():
        rows = torch.cat([window.rows(), new_BL], 1)
        return rows, Window(rows, total - kept, total, [total])
    if not _writable(window, new_BL):
        # a fresh buffer with room for as many rows again as the window keeps
        capacity = total + max(kept, MIN_HEADROOM)
        buf = new_BL.new_empty(new_BL.shape[0], capacity, *new_BL.shape[2:])
        if old:
            buf[:, :old] = window.rows()
        window = Window(buf, 0, old, [old])
    end = window.end + new_BL.shape[1]
    window.buf[:, window.end : end] = new_BL
    window.frontier[0] = end
    rows = window.buf[:, window.start : end]
    return rows, Window(window.buf, end - kept, end, window.frontier)


def _writable(window: Window | None, new_BL: Tensor) -> bool:
    """Whether new_BL can be written after window's rows in its own buffer."""
    if window is None:
        return False
    buf = window.buf
    return (
        window.frontier[0] == window.end
        and window.end + new_BL.shape[1] <= buf.shape[1]
        and buf.shape[0] == new_BL.shape[0]
        and buf.shape[2:] == new_BL.shape[2:]
        and buf.dtype == new_BL.dtype
        and buf.device == new_BL.device
    )


torch.utils._pytree.register_pytree_node(
    Window,
    lambda w: ([w.buf], (w.start, w.end, w.frontier)),
    lambda children, context: Window(children[0], *context),
    serialized_type_name="moe_models.window.Window",
)
