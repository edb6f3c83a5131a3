"""Where each (token, slot) row lives while the expert matmuls run: the row layouts of the backends.

SortedLayout: the N = T * K rows in expert-sorted order, expert e owning rows
offsets[e]:offsets[e + 1]. The autograd Functions only move data through these methods, so a
backend may choose another layout (the padded one of the torch backend) without touching them.
"""

import torch
import torch.nn.functional as F

from moe_kernels.expert_matmul.rows import Rows
from moe_kernels.routing.naive import Routing


def sum_slot_major(rows_RX: torch.Tensor, row_of_flat_N: torch.Tensor, n_slots: int):
    """out[t] = sum over k of rows[row_of_flat[t * K + k]]; [T, X]. On the CPU one embedding_bag
    (a bag of K rows per token) reads each row once and writes T rows; gathering the N = T * K
    rows first writes and reads N rows more (3x slower at (T, X, K) = (2048, 256, 4)). It sums
    a bag in slot order, without atomics. On CUDA the rows are gathered slot by slot
    ([K, T, X]), so that the sum runs over the outer dim."""
    if n_slots == 1:
        return rows_RX.index_select(0, row_of_flat_N)
    if rows_RX.device.type == "cpu":
        return F.embedding_bag(row_of_flat_N.view(-1, n_slots), rows_RX, mode="sum")
    slot_major_N = row_of_flat_N.view(-1, n_slots).t().reshape(-1)
    rows_KTX = rows_RX.index_select(0, slot_major_N).view(n_slots, -1, rows_RX.shape[1])
    return rows_KTX.sum(0)


class SortedLayout:
    def __init__(self, routing: Routing, n_slots: int):
        self.routing = routing
        self.n_slots = n_slots
        self.n_tokens = routing.order_N.numel() // n_slots
        self.token_N = routing.order_N // n_slots

    def take_tokens(self, data_TX: torch.Tensor, zero_pads: bool = True) -> Rows:
        """Row n is data[token of n] (the same token row for all its slots). zero_pads=False lets
        a padded layout leave its pad rows unzeroed, for rows whose pads meet only zero gates."""
        return self.take(data_TX, self.token_N)

    def take_flat(self, data_NX: torch.Tensor) -> Rows:
        """Row n is data[flat (token, slot) index of n]."""
        return self.take(data_NX, self.routing.order_N)

    def take(self, data: torch.Tensor, index: torch.Tensor) -> Rows:
        return Rows(data, index)

    def row_gates(self, gates_TK: torch.Tensor) -> torch.Tensor:
        """The gate of every row as a column [N, 1]."""
        return gates_TK.reshape(-1, 1).index_select(0, self.routing.order_N)

    def unsort(self, rows_NX: torch.Tensor) -> torch.Tensor:
        """Rows back to flat (token, slot) order."""
        return rows_NX.index_select(0, self.routing.inverse_N)

    def compact(self, rows_NX: torch.Tensor) -> torch.Tensor:
        """Rows of this layout as the N sorted rows, the layout the ops save for the backward."""
        return rows_NX

    def from_compact(self, rows_NX: torch.Tensor, zero_pads: bool = True) -> Rows:
        """The N sorted rows in this layout."""
        return Rows(rows_NX)

    def sum_slots(self, rows_NX: torch.Tensor) -> torch.Tensor:
        """out[t] = sum over k of the row of (t, k); [T, X]. Deterministic: no atomics."""
        return sum_slot_major(rows_NX, self.routing.inverse_N, self.n_slots)
