"""The CPU fast path (the torch backend): grouped matmuls over expert-sorted rows.

Rows arrive sorted by expert (expert e owns rows offsets[e]:offsets[e + 1]), so every expert's
block is a contiguous slice and no Python loop ever runs over tokens. The products use
`torch._grouped_mm` (fp32/bf16/fp16 with 16-byte aligned rows; on the CPU it loops over the
groups itself) and otherwise a loop over experts on contiguous slices (any dtype, fp64 included).
The padded layout (one bmm per product) is the alternative for many small experts; see
`choose_torch_backend`. These backends also run on CUDA for fp64, which Triton does not take.

Host reads, kept for speed (on the CPU a read waits for nothing): the layout choice and the
padded capacity read max(count), the per-expert loops read the offsets. On CUDA (fp64, or a torch
backend forced) each of these is a device-to-host synchronisation; the Triton path has none.
"""

import torch

from moe_kernels.expert_matmul.layout import SortedLayout, sum_slot_major
from moe_kernels.expert_matmul.rows import Rows
from moe_kernels.routing.naive import Routing

_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_applies(d_in: int, d_out: int, *mats: torch.Tensor) -> bool:
    """_grouped_mm wants 16-byte aligned strides: d_in and d_out a multiple of 16 bytes, and each
    operand with one unit stride among its last two dims."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    for m in mats:
        if m.dtype not in _GROUPED_DTYPES or m.numel() == 0 or 1 not in m.stride()[-2:]:
            return False
    size = mats[0].element_size()
    return (d_in * size) % 16 == 0 and (d_out * size) % 16 == 0


def grouped_mm(a_NI: torch.Tensor, w_EIO: torch.Tensor, offsets_E1: torch.Tensor) -> torch.Tensor:
    """out[n] = a[n] @ w[e] for every sorted row n of expert e; [N, O]. w may be a transposed view."""
    if _grouped_mm_applies(w_EIO.shape[1], w_EIO.shape[2], a_NI, w_EIO):
        return torch._grouped_mm(a_NI, w_EIO, offsets_E1[1:].to(torch.int32))
    out_NO = a_NI.new_empty(a_NI.shape[0], w_EIO.shape[2])
    bounds = offsets_E1.tolist()
    for e in range(w_EIO.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(a_NI[lo:hi], w_EIO[e], out=out_NO[lo:hi])
    return out_NO


def grouped_mm_dw(
    a_NI: torch.Tensor, dy_NO: torch.Tensor, offsets_E1: torch.Tensor
) -> torch.Tensor:
    """dw[e] = a[rows of e]^T @ dy[rows of e]; [E, I, O], zero for experts without rows."""
    a_IN = a_NI.t()
    if _grouped_mm_applies(a_IN.shape[0], dy_NO.shape[1], a_IN, dy_NO):
        return torch._grouped_mm(a_IN, dy_NO, offsets_E1[1:].to(torch.int32))
    E = offsets_E1.numel() - 1
    dw_EIO = dy_NO.new_zeros(E, a_NI.shape[1], dy_NO.shape[1])
    bounds = offsets_E1.tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(a_IN[:, lo:hi], dy_NO[lo:hi], out=dw_EIO[e])
    return dw_EIO


class GroupedTorchBackend(SortedLayout):
    """Compact expert-sorted rows and grouped matmuls. Gathers eagerly (once, so that backward
    reuses the gathered rows)."""

    def take(self, data: torch.Tensor, index: torch.Tensor) -> Rows:
        return Rows(data.index_select(0, index))

    def mm(self, a: Rows, w_EIO: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        w = w_EIO.transpose(1, 2) if transpose else w_EIO
        return grouped_mm(a.materialize(), w, self.routing.offsets_E1)

    def mm_dw(self, a: Rows, dy: Rows) -> torch.Tensor:
        return grouped_mm_dw(a.materialize(), dy.materialize(), self.routing.offsets_E1)


class PaddedTorchBackend:
    """Padded expert-major rows: expert e owns rows e * C : e * C + count_e of E * C rows, C the
    largest count, and the pad rows hold zeros, so each product is one bmm. Worth its padding
    when the experts are many and small: one batched call replaces E small matmuls (each its own
    parallel region, which costs most when the cores are shared)."""

    def __init__(self, routing: Routing, n_slots: int):
        self.routing = routing
        self.n_slots = n_slots
        N = routing.order_N.numel()
        self.n_tokens = N // n_slots
        counts_E = routing.counts_E
        self.n_experts = E = counts_E.numel()
        self.capacity = C = int(counts_E.max()) if N else 0
        device = counts_E.device
        # the expert of each sorted row by a search of the offsets: repeat_interleave costs a
        # parallel region, which waits a scheduler slice for its second thread on a busy machine
        sorted_N = torch.arange(N, device=device)
        expert_N = torch.searchsorted(routing.offsets_E1[1:], sorted_N, right=True)
        rank_N = sorted_N - routing.offsets_E1.index_select(0, expert_N)
        self.padded_N = padded_N = expert_N * C + rank_N  # padded row of the n-th sorted row
        # flat (token, slot) index and sorted position of each padded row; N marks a pad (so
        # N // K = T does too)
        fill_R = padded_N.new_full((E * C,), N)
        self.flat_R = fill_R.scatter(0, padded_N, routing.order_N)
        self.sorted_R = fill_R.scatter_(0, padded_N, sorted_N)
        self.token_R = self.flat_R // n_slots
        self.padded_of_flat_N = padded_N.index_select(0, routing.inverse_N)

    def take(self, data: torch.Tensor, index_R: torch.Tensor, zero_pads: bool = True) -> Rows:
        """Row r is data[index[r]]; the pads (index len(data)) hold zeros, or with zero_pads=False
        a copy of row 0: for rows whose pads only ever meet zero gates, which spares copying the
        data with a zero row appended."""
        if zero_pads or len(data) == 0:
            data = torch.cat([data, data.new_zeros(1, *data.shape[1:])])
            return Rows(data.index_select(0, index_R))
        return Rows(data.index_select(0, index_R.remainder(len(data))))

    def take_tokens(self, data_TX: torch.Tensor, zero_pads: bool = True) -> Rows:
        return self.take(data_TX, self.token_R, zero_pads)

    def take_flat(self, data_NX: torch.Tensor) -> Rows:
        return self.take(data_NX, self.flat_R)

    def row_gates(self, gates_TK: torch.Tensor) -> torch.Tensor:
        return self.take_flat(gates_TK.reshape(-1, 1)).data

    def compact(self, rows_RX: torch.Tensor) -> torch.Tensor:
        """The N sorted rows (pads dropped): the ops save rows of one size whatever the layout."""
        return rows_RX.index_select(0, self.padded_N)

    def from_compact(self, rows_NX: torch.Tensor, zero_pads: bool = True) -> Rows:
        return self.take(rows_NX, self.sorted_R, zero_pads)

    def unsort(self, rows_RX: torch.Tensor) -> torch.Tensor:
        return rows_RX.index_select(0, self.padded_of_flat_N)

    def sum_slots(self, rows_RX: torch.Tensor) -> torch.Tensor:
        return sum_slot_major(rows_RX, self.padded_of_flat_N, self.n_slots)

    def _batched(self, rows_RX: torch.Tensor) -> torch.Tensor:
        return rows_RX.view(self.n_experts, self.capacity, rows_RX.shape[1])

    def mm(self, a: Rows, w_EIO: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        w = w_EIO.transpose(1, 2) if transpose else w_EIO
        return torch.bmm(self._batched(a.data), w).view(-1, w.shape[2])

    def mm_dw(self, a: Rows, dy: Rows) -> torch.Tensor:
        return torch.bmm(self._batched(a.data).transpose(1, 2), self._batched(dy.data))


# Padding waste above which the padded layout stops paying for itself.
MAX_PADDING = 1.5


def choose_torch_backend(routing: Routing, n_slots: int, layout: str = "auto"):
    """layout 'grouped', 'padded', or 'auto': padded when E * max(count) <= MAX_PADDING * N.

    Measured on this shared 2-core machine: the padded layout was within about 30% of the
    grouped one in uncontended single-thread minima at (T, d, E, G, K) = (1024, 256, 128, 32, 8),
    and 1.4x to 5x faster in the benchmark's medians on all four CPU shapes while other processes
    shared the cores, as each of the E small matmuls pays a thread-pool wake-up.
    """
    N = routing.order_N.numel()
    if layout == "auto":
        padded_rows = routing.counts_E.numel() * int(routing.counts_E.max()) if N else 0
        layout = "padded" if N and padded_rows <= MAX_PADDING * N else "grouped"
    if layout == "padded":
        return PaddedTorchBackend(routing, n_slots)
    return GroupedTorchBackend(routing, n_slots)
