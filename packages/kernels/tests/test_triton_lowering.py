"""The Triton kernels compile for an sm_90 GPU without one: every kernel in bf16 at its largest
configuration, the forward kernel also in fp16 and fp32; bf16 and fp16 on tensor cores (wgmma,
not widened to fp32 as under the interpreter), fp32 as IEEE dots, all within the shared memory
of an H100/H200. (Compiling is slow on a small CPU, hence not every kernel in every dtype.)

The compilation runs in a subprocess without TRITON_INTERPRET (under it @triton.jit makes
interpreted functions, which do not compile); it specializes the arguments as a launch on
contiguous tensors does (16-byte aligned pointers and sizes, unit inner strides).
"""

import os
import subprocess
import sys

import pytest

SHARED_MEMORY_SM90 = 232448  # bytes a block may use on sm_90 (227 KiB)
UNIT_STRIDES = {
    "expert_matmul_fwd_kernel": ("stride_xk", "stride_wn", "stride_yn"),
    "expert_matmul_bwd_dx_kernel": ("stride_dyk", "stride_w_out", "stride_dxn"),
    "expert_matmul_bwd_dw_kernel": ("stride_xk", "stride_dyn", "stride_dwn"),
}


def _largest(configs):
    """The configuration of most shared memory: stages x reduction block x (rows + columns)."""

    def shared(config):
        rows, cols, reduction = config.kwargs.values()
        return config.num_stages * reduction * (rows + cols)

    return max(configs, key=shared)


def lower_all() -> list[str]:
    """One line per (kernel, dtype): 'name dtype shared wgmma'."""
    import torch
    import triton
    from moe_kernels.expert_matmul import triton as kernels
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cases = [
        (
            kernels.expert_matmul_fwd_kernel,
            kernels._MATMUL_CONFIGS,
            dict(HAS_ROWS=True),
            {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32},
        ),
        (
            kernels.expert_matmul_bwd_dx_kernel,
            kernels._MATMUL_CONFIGS,
            dict(HAS_ROWS=False),
            {"bf16": torch.bfloat16},
        ),
        (
            kernels.expert_matmul_bwd_dw_kernel,
            kernels._DW_CONFIGS,
            dict(HAS_X_ROWS=True, HAS_DY_ROWS=False),
            {"bf16": torch.bfloat16},
        ),
    ]
    lines = []
    for autotuned, configs, flags, dtypes in cases:
        fn, config = autotuned.fn, _largest(configs)
        for dtype, torch_dtype in dtypes.items():
            # the flags TritonBackend passes on hardware
            consts = dict(
                flags,
                IEEE=torch_dtype == torch.float32,
                UPCAST=kernels._upcast(torch_dtype),
                **config.kwargs,
            )
            if "E_CHUNK" in fn.arg_names:
                consts["E_CHUNK"] = 128
            consts.update(dict.fromkeys(UNIT_STRIDES[fn.__name__], 1))
            signature, attrs = {}, {}
            for i, name in enumerate(fn.arg_names):
                if name in consts:
                    signature[name] = "constexpr"
                    continue
                index = "rows" in name or "offsets" in name
                if name.endswith("_ptr"):
                    signature[name] = "*i64" if index else f"*{dtype}"
                else:
                    signature[name] = "i32"
                if name not in ("n_experts", "rows_bucket"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
            compiled = triton.compile(
                ASTSource(fn, signature, consts, attrs),
                target=GPUTarget("cuda", 90, 32),
                options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
            )
            wgmma = "warp_group_dot" in compiled.asm["ttgir"]
            lines.append(f"{fn.__name__} {dtype} {compiled.metadata.shared} {wgmma}")
    return lines


@pytest.mark.triton
def test_kernels_lower_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    if "no nvidia backend" in done.stdout:
        pytest.skip("this Triton build has no CUDA backend")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines()]
    assert len(lines) == 5, done.stdout
    for name, dtype, shared, wgmma in lines:
        assert int(shared) <= SHARED_MEMORY_SM90, f"{name} {dtype}: {shared} bytes of shared memory"
        assert (wgmma == "True") == (dtype != "fp32"), f"{name} {dtype}: wgmma {wgmma}"


def _kept(prune, configs, **args):
    return [tuple(c.kwargs.values()) for c in prune(configs, args)]


def test_autotuning_drops_tiles_far_larger_than_the_problem():
    kernels = pytest.importorskip("moe_kernels.expert_matmul.triton")
    if kernels.INTERPRET:
        pytest.skip("the interpreter runs one fixed configuration")
    tiny = dict(rows_bucket=64, n_experts=4, d_in=8, d_out=8)
    for prune, configs in [
        (kernels._PRUNE_FWD, kernels._MATMUL_CONFIGS),
        (kernels._PRUNE_DX, kernels._MATMUL_CONFIGS),
        (kernels._PRUNE_DW, kernels._DW_CONFIGS),
    ]:
        kept = _kept(prune, configs, **tiny)
        assert kept and all(max(blocks[:2]) <= 64 for blocks in kept), kept
        # the benchmark's GPU shapes: every tile fits, so every config is measured
        for T, D, E, G, K in [(32768, 512, 128, 128, 4), (16384, 4096, 8, 8192, 2)]:
            big = dict(rows_bucket=T * K, n_experts=E, d_in=D, d_out=G)
            assert len(_kept(prune, configs, **big)) == len(configs)


if __name__ == "__main__":
    from triton.backends import backends

    if "nvidia" not in backends:
        print("no nvidia backend")
        sys.exit(0)
    print("\n".join(lower_all()))
