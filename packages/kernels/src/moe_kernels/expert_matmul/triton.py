"""Triton kernels of the expert matmul over expert-sorted rows, and the backend that launches them.

The input rows are gathered inside the kernels' loads (a row index per sorted row), so neither
the forward input nor the output gradient is ever materialized in sorted order. Row tiles never
straddle two experts: each expert's sorted rows are cut into BLOCK_M tiles, and a tile table
(expert, first row, end row) drives the grid. The table is sized by the bound cdiv(N, BLOCK_M) + E
so that building it needs no device-to-host sync; the unused entries are empty tiles.
Accumulation is fp32 for every input dtype (fp32 inputs use IEEE-precision dots, not TF32).

Importing this module needs Triton; moe_kernels imports it only when the Triton backend is used.
"""

import os

import torch
import triton
import triton.language as tl

from moe_kernels.expert_matmul.layout import SortedLayout
from moe_kernels.expert_matmul.rows import Rows
from moe_kernels.routing.naive import Routing


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. UPCAST: the Triton interpreter's dot misreads bf16 (numpy has no
    bf16), so under TRITON_INTERPRET=1 bf16 operands are widened to fp32 first."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE or UPCAST:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _tile_times_expert_matrix(
    a_ptr, a_rows_ptr, w_ptr, out_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    n_in, n_out,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_om, stride_on,
    HAS_ROWS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[m, n-block] = a[row(m)] @ w[e][:, n-block] for the sorted rows m of one tile."""
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    if HAS_ROWS:
        src_m = tl.load(a_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        src_m = offs_m.to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < n_in
        a = tl.load(
            a_ptr + src_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = _dot(a, w, acc, IEEE, UPCAST)
    out_offs = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(
        out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :]
    )


@triton.jit
def expert_matmul_fwd_kernel(
    x_ptr, x_rows_ptr, w_ptr, y_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    d_in, d_out,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
    HAS_ROWS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[m] = x[x_rows[m]] @ w[e] for the sorted rows m of expert e; y [N, d_out] sorted."""
    _tile_times_expert_matrix(
        x_ptr, x_rows_ptr, w_ptr, y_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
        d_in, d_out, stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
        HAS_ROWS, IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip


@triton.jit
def expert_matmul_bwd_dx_kernel(
    dy_ptr, dy_rows_ptr, w_ptr, dx_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    d_in, d_out,
    stride_dym, stride_dyk, stride_we, stride_w_in, stride_w_out, stride_dxm, stride_dxn,
    HAS_ROWS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dx[m] = dy[dy_rows[m]] @ w[e]^T: w [E, d_in, d_out] is read transposed through its strides."""
    _tile_times_expert_matrix(
        dy_ptr, dy_rows_ptr, w_ptr, dx_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
        d_out, d_in, stride_dym, stride_dyk, stride_we, stride_w_out, stride_w_in,
        stride_dxm, stride_dxn, HAS_ROWS, IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip


@triton.jit
def expert_matmul_bwd_dw_kernel(
    x_ptr, x_rows_ptr, dy_ptr, dy_rows_ptr, dw_ptr, offsets_ptr,
    d_in, d_out,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_dwe, stride_dwk, stride_dwn,
    HAS_X_ROWS: tl.constexpr, HAS_DY_ROWS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """dw[e] = x[rows of e]^T @ dy[rows of e], one (d_in, d_out) block of one expert per program.

    Experts without rows store zeros, so dw needs no separate initialization."""
    e = tl.program_id(0)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_o = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_i = offs_i < d_in
    mask_o = offs_o < d_out
    acc = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        if HAS_X_ROWS:
            src_x = tl.load(x_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        else:
            src_x = offs_m.to(tl.int64)
        if HAS_DY_ROWS:
            src_dy = tl.load(dy_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        else:
            src_dy = offs_m.to(tl.int64)
        x_t = tl.load(
            x_ptr + src_x[None, :] * stride_xm + offs_i[:, None] * stride_xk,
            mask=mask_m[None, :] & mask_i[:, None],
            other=0.0,
        )  # [BLOCK_I, BLOCK_M]
        dy = tl.load(
            dy_ptr + src_dy[:, None] * stride_dym + offs_o[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_o[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_O]
        acc = _dot(x_t, dy, acc, IEEE, UPCAST)
    dw_offs = (
        e.to(tl.int64) * stride_dwe + offs_i[:, None] * stride_dwk + offs_o[None, :] * stride_dwn
    )
    tl.store(
        dw_ptr + dw_offs, acc.to(dw_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_o[None, :]
    )


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _block(n: int, cap: int) -> int:
    """Smallest power of two >= n within [16, cap] (tl.dot needs every block dim >= 16)."""
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def tile_table(routing: Routing, block_m: int):
    """(expert, start, end) of each BLOCK_M tile of sorted rows, padded with empty tiles to the
    sync-free bound cdiv(N, BLOCK_M) + E."""
    offsets = routing.offsets_E1
    E = offsets.numel() - 1
    n_tiles = triton.cdiv(routing.order_N.numel(), block_m) + E
    tiles_E = (routing.counts_E + block_m - 1) // block_m
    tile_ends_E = torch.cumsum(tiles_E, 0)
    tile = torch.arange(n_tiles, device=offsets.device)
    expert = torch.searchsorted(tile_ends_E, tile, right=True)
    valid = expert < E
    expert = expert.clamp(max=E - 1)
    first_tile = tile_ends_E[expert] - tiles_E[expert]
    start = offsets[expert] + (tile - first_tile) * block_m
    end = torch.minimum(start + block_m, offsets[expert + 1])
    start = torch.where(valid, start, 0)
    end = torch.where(valid, end, 0)
    return expert.contiguous(), start.contiguous(), end.contiguous()


def _rows_arg(rows: Rows) -> tuple[torch.Tensor, torch.Tensor, bool]:
    data = rows.data
    if rows.index is None:
        return data, data, False
    return data, rows.index.contiguous(), True


class TritonBackend(SortedLayout):
    """Launches the kernels; gathers stay lazy (Rows) and happen inside the kernels' loads."""

    BLOCK_M = 64
    BLOCK_N = 64
    BLOCK_K = 32

    def __init__(self, routing: Routing, n_slots: int):
        super().__init__(routing, n_slots)
        self.tiles = tile_table(routing, self.BLOCK_M)

    def mm(self, a: Rows, w_EIO: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        data, rows, has_rows = _rows_arg(a)
        E, d_in, d_out = w_EIO.shape
        n_out = d_in if transpose else d_out
        n_red = d_out if transpose else d_in
        N = self.routing.order_N.numel()
        out = data.new_empty(N, n_out)
        if N == 0 or n_out == 0:
            return out
        if n_red == 0:
            return out.zero_()
        kernel = expert_matmul_bwd_dx_kernel if transpose else expert_matmul_fwd_kernel
        block_n = _block(n_out, self.BLOCK_N)
        grid = (self.tiles[0].numel(), triton.cdiv(n_out, block_n))
        kernel[grid](
            data, rows, w_EIO, out, *self.tiles,
            d_in, d_out,
            data.stride(0), data.stride(1), *w_EIO.stride(), out.stride(0), out.stride(1),
            HAS_ROWS=has_rows, IEEE=data.dtype == torch.float32, UPCAST=_upcast(data.dtype),
            BLOCK_M=self.BLOCK_M, BLOCK_N=block_n, BLOCK_K=_block(n_red, self.BLOCK_K),
        )  # fmt: skip
        return out

    def mm_dw(self, a: Rows, dy: Rows) -> torch.Tensor:
        x, x_rows, has_x_rows = _rows_arg(a)
        g, g_rows, has_g_rows = _rows_arg(dy)
        E = self.routing.counts_E.numel()
        d_in, d_out = x.shape[1], g.shape[1]
        dw = x.new_empty(E, d_in, d_out)
        if dw.numel() == 0:
            return dw
        block_i, block_o = _block(d_in, 64), _block(d_out, 64)
        grid = (E, triton.cdiv(d_in, block_i), triton.cdiv(d_out, block_o))
        expert_matmul_bwd_dw_kernel[grid](
            x, x_rows, g, g_rows, dw, self.routing.offsets_E1,
            d_in, d_out,
            x.stride(0), x.stride(1), g.stride(0), g.stride(1), *dw.stride(),
            HAS_X_ROWS=has_x_rows, HAS_DY_ROWS=has_g_rows, IEEE=x.dtype == torch.float32, UPCAST=_upcast(x.dtype),
            BLOCK_I=block_i, BLOCK_O=block_o, BLOCK_M=32,
        )  # fmt: skip
        return dw
