"""Triton kernels of the expert matmul over expert-sorted rows, and the backend that launches them.

The input rows are gathered inside the kernels' loads (a row index per sorted row), so neither
the forward input nor the output gradient is ever materialized in sorted order. Row tiles never
straddle two experts: each expert's sorted rows are cut into BLOCK_M tiles, and every program
finds its tile (expert, first row, end row) from the expert offsets itself, so BLOCK_M is free for
the autotuner and nothing is read back to size the grid: it has the bound cdiv(N, BLOCK_M) + E - 1
of tiles, the programs past the last tile doing nothing. Accumulation is fp32 for every input
dtype (fp32 inputs use IEEE-precision dots, not TF32).

Block sizes, num_warps and num_stages are autotuned per (d_in, d_out, E, row-count bucket, dtype)
on the first launch of each such key (that first launch benchmarks, so it synchronizes once),
among the configurations whose tiles do not far exceed the problem; under TRITON_INTERPRET=1,
which cannot afford tuning, one small fixed configuration runs. bf16 and fp16 go to tl.dot as
they are on hardware; only the interpreter widens bf16 (UPCAST).

Importing this module needs Triton; moe_kernels imports it only when the Triton backend is used.
"""

import math
import os

import torch
import triton
import triton.language as tl

from moe_kernels.expert_matmul.layout import SortedLayout
from moe_kernels.expert_matmul.rows import Rows

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(names: tuple[str, str, str], shapes) -> list[triton.Config]:
    """shapes: (block sizes..., num_warps, num_stages) for hardware; one small one interpreted."""
    if INTERPRET:
        return [triton.Config(dict.fromkeys(names, 32), num_warps=4, num_stages=1)]
    return [
        triton.Config(dict(zip(names, blocks, strict=True)), num_warps=w, num_stages=s)
        for *blocks, w, s in shapes
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): large tiles for many rows per expert, small
# row tiles for experts with few rows (less of each tile masked off).
_MATMUL_CONFIGS = _configs(
    ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 256, 32, 8, 4),
        (64, 64, 64, 4, 4),
        (32, 64, 64, 4, 4),
        (16, 64, 128, 4, 3),
    ],
)
# (BLOCK_I, BLOCK_O, BLOCK_M, num_warps, num_stages) of the weight gradient.
_DW_CONFIGS = _configs(
    ("BLOCK_I", "BLOCK_O", "BLOCK_M"),
    [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 4, 3),
        (32, 64, 64, 4, 4),
    ],
)
_MATMUL_KEY = ["d_in", "d_out", "n_experts", "rows_bucket", "HAS_ROWS"]


def _pruner(sizes_of):
    """early_config_prune: drop tiles far larger than the problem. A config's overshoot is the
    factor of masked-off work, the product over its blocks of block / next_pow2(dimension) where
    above 1; the configs within twice the smallest overshoot stay (all of them on large shapes).
    sizes_of(args) -> the dimensions the three blocks cut, in the configs' order."""

    def prune(configs, named_args, **kwargs):
        sizes = [triton.next_power_of_2(max(1, n)) for n in sizes_of(named_args)]

        def overshoot(config):
            blocks = config.kwargs.values()
            return math.prod(max(1, b // n) for b, n in zip(blocks, sizes, strict=True))

        least = min(map(overshoot, configs))
        return [c for c in configs if overshoot(c) <= 2 * least]

    return prune


def _rows_per_expert(args) -> int:
    return max(1, args["rows_bucket"] // args["n_experts"])


_PRUNE_FWD = _pruner(lambda a: (_rows_per_expert(a), a["d_out"], a["d_in"]))
_PRUNE_DX = _pruner(lambda a: (_rows_per_expert(a), a["d_in"], a["d_out"]))
_PRUNE_DW = _pruner(lambda a: (a["d_in"], a["d_out"], _rows_per_expert(a)))


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
def _row_tile(offsets_ptr, n_experts, BLOCK_M: tl.constexpr, E_CHUNK: tl.constexpr):
    """(expert, first row, end row) of this program's tile: the tiles of expert e come after those
    of the experts before it, cdiv(count_e, BLOCK_M) each. Past the last tile, end == start."""
    tile = tl.program_id(0)
    seen = tl.full([], 0, tl.int64)  # tiles of the experts before the current chunk
    expert = tl.full([], 0, tl.int64)
    start = tl.full([], 0, tl.int64)
    end = tl.full([], 0, tl.int64)
    for e0 in range(0, n_experts, E_CHUNK):
        offs_e = e0 + tl.arange(0, E_CHUNK)
        mask_e = offs_e < n_experts
        lo = tl.load(offsets_ptr + offs_e, mask=mask_e, other=0)
        hi = tl.load(offsets_ptr + offs_e + 1, mask=mask_e, other=0)
        tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
        last = seen + tl.cumsum(tiles, 0)
        first = last - tiles
        mine = (first <= tile) & (tile < last)  # true for one expert at most
        row = lo + (tile - first) * BLOCK_M
        expert += tl.sum(tl.where(mine, offs_e.to(tl.int64), 0))
        start += tl.sum(tl.where(mine, row, 0))
        end += tl.sum(tl.where(mine, tl.minimum(row + BLOCK_M, hi), 0))
        seen += tl.sum(tiles)
    return expert, start, end


@triton.jit
def _tile_times_expert_matrix(
    a_ptr, a_rows_ptr, w_ptr, out_ptr, offsets_ptr, n_experts,
    n_in, n_out,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_om, stride_on,
    HAS_ROWS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, E_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[m, n-block] = a[row(m)] @ w[e][:, n-block] for the sorted rows m of one tile."""
    e, start, end = _row_tile(offsets_ptr, n_experts, BLOCK_M, E_CHUNK)
    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    if HAS_ROWS:
        src_m = tl.load(a_rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        src_m = offs_m
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_red = tl.where(end > start, n_in, 0)  # a program without a tile skips the loop
    for k0 in range(0, n_red, BLOCK_K):
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
    out_offs = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(
        out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :]
    )


@triton.autotune(
    configs=_MATMUL_CONFIGS, key=_MATMUL_KEY, prune_configs_by={"early_config_prune": _PRUNE_FWD}
)
@triton.jit(do_not_specialize=["rows_bucket"])
def expert_matmul_fwd_kernel(
    x_ptr, x_rows_ptr, w_ptr, y_ptr, offsets_ptr, n_experts, rows_bucket,
    d_in, d_out,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
    HAS_ROWS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, E_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[m] = x[x_rows[m]] @ w[e] for the sorted rows m of expert e; y [N, d_out] sorted.
    rows_bucket (a power of two >= N) only keys the autotuning."""
    _tile_times_expert_matrix(
        x_ptr, x_rows_ptr, w_ptr, y_ptr, offsets_ptr, n_experts,
        d_in, d_out, stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
        HAS_ROWS, IEEE, UPCAST, E_CHUNK, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip


@triton.autotune(
    configs=_MATMUL_CONFIGS, key=_MATMUL_KEY, prune_configs_by={"early_config_prune": _PRUNE_DX}
)
@triton.jit(do_not_specialize=["rows_bucket"])
def expert_matmul_bwd_dx_kernel(
    dy_ptr, dy_rows_ptr, w_ptr, dx_ptr, offsets_ptr, n_experts, rows_bucket,
    d_in, d_out,
    stride_dym, stride_dyk, stride_we, stride_w_in, stride_w_out, stride_dxm, stride_dxn,
    HAS_ROWS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, E_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dx[m] = dy[dy_rows[m]] @ w[e]^T: w [E, d_in, d_out] is read transposed through its strides."""
    _tile_times_expert_matrix(
        dy_ptr, dy_rows_ptr, w_ptr, dx_ptr, offsets_ptr, n_experts,
        d_out, d_in, stride_dym, stride_dyk, stride_we, stride_w_out, stride_w_in,
        stride_dxm, stride_dxn, HAS_ROWS, IEEE, UPCAST, E_CHUNK, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip


@triton.autotune(
    configs=_DW_CONFIGS,
    key=["d_in", "d_out", "n_experts", "rows_bucket", "HAS_X_ROWS"],
    prune_configs_by={"early_config_prune": _PRUNE_DW},
)
@triton.jit(do_not_specialize=["rows_bucket"])
def expert_matmul_bwd_dw_kernel(
    x_ptr, x_rows_ptr, dy_ptr, dy_rows_ptr, dw_ptr, offsets_ptr, n_experts, rows_bucket,
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
    """Only the interpreter needs bf16 widened; on hardware bf16 and fp16 feed tl.dot directly."""
    return INTERPRET and dtype == torch.bfloat16


def _rows_bucket(n_rows: int) -> int:
    return triton.next_power_of_2(max(n_rows, 1))


def _expert_chunk(n_experts: int) -> int:
    """Experts a program scans at once looking for its tile."""
    return min(triton.next_power_of_2(n_experts), 1024)


def _rows_arg(rows: Rows) -> tuple[torch.Tensor, torch.Tensor, bool]:
    data = rows.data
    if rows.index is None:
        return data, data, False
    return data, rows.index.contiguous(), True


class TritonBackend(SortedLayout):
    """Launches the kernels; gathers stay lazy (Rows) and happen inside the kernels' loads."""

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

        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_M"]) + E - 1, triton.cdiv(n_out, meta["BLOCK_N"]))

        kernel[grid](
            data, rows, w_EIO, out, self.routing.offsets_E1, E, _rows_bucket(N),
            d_in, d_out,
            data.stride(0), data.stride(1), *w_EIO.stride(), out.stride(0), out.stride(1),
            HAS_ROWS=has_rows, IEEE=data.dtype == torch.float32, UPCAST=_upcast(data.dtype),
            E_CHUNK=_expert_chunk(E),
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

        def grid(meta):
            return (E, triton.cdiv(d_in, meta["BLOCK_I"]), triton.cdiv(d_out, meta["BLOCK_O"]))

        expert_matmul_bwd_dw_kernel[grid](
            x, x_rows, g, g_rows, dw, self.routing.offsets_E1, E,
            _rows_bucket(self.routing.order_N.numel()),
            d_in, d_out,
            x.stride(0), x.stride(1), g.stride(0), g.stride(1), *dw.stride(),
            HAS_X_ROWS=has_x_rows, HAS_DY_ROWS=has_g_rows, IEEE=x.dtype == torch.float32,
            UPCAST=_upcast(x.dtype),
        )  # fmt: skip
        return dw
