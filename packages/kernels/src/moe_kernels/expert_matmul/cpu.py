"""The CPU fast path (the torch backend): grouped matmuls over expert-sorted rows.

Rows arrive sorted by expert (expert e owns rows offsets[e]:offsets[e + 1]), so every expert's
block is a contiguous slice and no Python loop ever runs over tokens. The products use
`torch._grouped_mm` (one call for all experts; fp32/bf16/fp16 with 16-byte aligned rows) and
otherwise a loop over experts on contiguous slices (any dtype, fp64 included). Measured on 2 CPU
threads, _grouped_mm beats padded bmm (which pays for the padding rows and the padded gather) and
matches or beats the loop; the loop remains the general fallback.
The backend also runs on CUDA for the dtypes Triton does not take (fp64).
"""

import torch

from moe_kernels.expert_matmul.rows import Rows
from moe_kernels.routing.naive import Routing

_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_applies(*mats: torch.Tensor) -> bool:
    """_grouped_mm needs one unit stride and the other strides multiples of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    for m in mats:
        if m.dtype not in _GROUPED_DTYPES or m.numel() == 0 or 1 not in m.stride()[-2:]:
            return False
        if any((s * m.element_size()) % 16 for s in m.stride() if s != 1):
            return False
    return True


def grouped_mm(a_NI: torch.Tensor, w_EIO: torch.Tensor, offsets_E1: torch.Tensor) -> torch.Tensor:
    """out[n] = a[n] @ w[e] for every sorted row n of expert e; [N, O]. w may be a transposed view."""
    if _grouped_mm_applies(a_NI, w_EIO):
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
    if _grouped_mm_applies(a_IN, dy_NO):
        return torch._grouped_mm(a_IN, dy_NO, offsets_E1[1:].to(torch.int32))
    E = offsets_E1.numel() - 1
    dw_EIO = dy_NO.new_zeros(E, a_NI.shape[1], dy_NO.shape[1])
    bounds = offsets_E1.tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(a_IN[:, lo:hi], dy_NO[lo:hi], out=dw_EIO[e])
    return dw_EIO


class TorchBackend:
    """Gathers eagerly (once, so backward reuses the gathered rows) and scatters with index_add_."""

    def __init__(self, routing: Routing, n_slots: int):
        self.routing = routing
        self.n_slots = n_slots
        self.token_N = routing.order_N // n_slots

    def take(self, data: torch.Tensor, index: torch.Tensor | None) -> Rows:
        return Rows(Rows(data, index).materialize())

    def mm(self, a: Rows, w_EIO: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        w = w_EIO.transpose(1, 2) if transpose else w_EIO
        return grouped_mm(a.materialize(), w, self.routing.offsets_E1)

    def mm_dw(self, a: Rows, dy: Rows) -> torch.Tensor:
        return grouped_mm_dw(a.materialize(), dy.materialize(), self.routing.offsets_E1)

    def sum_slots(self, rows_NO: torch.Tensor) -> torch.Tensor:
        """out[t] = sum over k of the sorted row of (t, k); [T, O].

        index_add_ is deterministic on the CPU; on CUDA it uses atomics, so there the rows are
        permuted back to flat (token, slot) order and summed over the slots instead.
        """
        n_tokens = self.routing.order_N.numel() // self.n_slots
        if rows_NO.is_cuda:
            return (
                unsort(rows_NO, self.routing).view(n_tokens, self.n_slots, rows_NO.shape[1]).sum(1)
            )
        out_TO = rows_NO.new_zeros(n_tokens, rows_NO.shape[1])
        return out_TO.index_add_(0, self.token_N, rows_NO)


def unsort(rows_N: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Sorted rows back to flat (token, slot) order."""
    return rows_N.index_select(0, routing.inverse_N)
