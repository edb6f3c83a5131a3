"""Hypothesis strategies and the fast-vs-reference comparison shared by the kernels tests, handed
out as the session fixture `kt` (under --import-mode=importlib test modules cannot import this file).

Strategies draw shapes, dtypes, options and a seed, never tensor values; tensors come from a
torch generator seeded by the drawn seed. The tolerance rule: a fast path's error against the
fp64 reference is at most twice the reference path's own error in the same dtype, plus a small
absolute floor scaled by the dtype's epsilon and the magnitude of the values.
"""

import os
from dataclasses import dataclass
from types import SimpleNamespace

import moe_kernels
import pytest
import torch
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TRITON_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The interpreter runs kernels on CPU tensors; the `gpu` session runs the same tests on CUDA.
TRITON_DEVICE = (
    "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
)


@dataclass(frozen=True)
class Case:
    T: int
    d_in: int
    d_out: int
    E: int
    K: int
    n_used: int  # experts that may receive tokens; the others stay empty
    dtype: torch.dtype
    seed: int
    x_per_slot: bool  # x [T, K, d_in] instead of [T, d_in]
    gated: bool
    drop: bool  # zero some gates, as capacity limits do
    noncontiguous: bool
    activation: str = "relu"


@st.composite
def cases(draw, max_T=40, max_d=24, max_E=8, dtypes=DTYPES, aligned=False):
    """aligned: feature sizes multiples of 8, the sizes torch._grouped_mm accepts."""
    E = draw(st.integers(1, max_E))
    step = 8 if aligned else 1
    K = draw(st.integers(1, E))
    return Case(
        T=draw(st.sampled_from([0, 1, draw(st.integers(2, max_T))])),
        d_in=step * draw(st.integers(1, max_d // step)),
        d_out=step * draw(st.integers(1, max_d // step)),
        E=E,
        K=K,
        n_used=draw(st.integers(K, E)),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**31 - 1)),
        x_per_slot=draw(st.booleans()),
        gated=draw(st.booleans()),
        drop=draw(st.booleans()),
        noncontiguous=draw(st.booleans()),
        activation=draw(st.sampled_from(["relu", "gelu", "silu", "swiglu"])),
    )


def _randn(shape, gen, dtype, noncontiguous, device):
    """Normal values; noncontiguous gives a view with the last two dims transposed in memory."""
    if noncontiguous and len(shape) >= 2:
        swapped = (*shape[:-2], shape[-1], shape[-2])
        return (
            torch.randn(swapped, generator=gen, dtype=torch.float64)
            .to(device, dtype)
            .transpose(-1, -2)
        )
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


def routing_ids(case: Case, gen, device="cpu") -> torch.Tensor:
    """K distinct experts per token among the first n_used (so experts >= n_used get no token)."""
    scores = torch.rand(case.T, case.n_used, generator=gen)
    return scores.argsort(dim=1)[:, : case.K].to(device)


def make_inputs(case: Case, kind: str, device="cpu") -> dict:
    gen = torch.Generator().manual_seed(case.seed)
    dt, nc = case.dtype, case.noncontiguous
    idx = routing_ids(case, gen, device)
    gates = torch.rand(case.T, case.K, generator=gen, dtype=torch.float64)
    if case.drop:
        gates = gates * (torch.rand(case.T, case.K, generator=gen) > 0.3)
    gates = gates.to(device, dt)
    if kind == "mlp":
        inputs = dict(
            x=_randn((case.T, case.d_in), gen, dt, nc, device),
            w1=_randn((case.E, case.d_in, case.d_out), gen, dt, nc, device) / case.d_in**0.5,
            w2=_randn((case.E, case.d_out, case.d_in), gen, dt, nc, device) / case.d_out**0.5,
            idx=idx,
            gates=gates,
        )
        if case.activation == "swiglu":
            w3 = _randn((case.E, case.d_in, case.d_out), gen, dt, nc, device) / case.d_in**0.5
            inputs["w3"] = w3
        return inputs
    x_shape = (case.T, case.K, case.d_in) if case.x_per_slot else (case.T, case.d_in)
    return dict(
        x=_randn(x_shape, gen, dt, nc, device),
        w=_randn((case.E, case.d_in, case.d_out), gen, dt, nc, device) / case.d_in**0.5,
        idx=idx,
        gates=gates if case.gated else None,
    )


def outputs_and_grads(fn, inputs: dict, seed: int, dtype=None, **kwargs) -> list[torch.Tensor]:
    """[output, grad of every floating input] for a fixed random output gradient."""
    leaves = {}
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
            leaves[name] = (t if dtype is None else t.to(dtype)).detach().requires_grad_()
    args = {**inputs, **leaves}
    out = fn(**args, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    if out.requires_grad:
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out, allow_unused=True)
    else:  # the reference's empty output (T = 0) is not connected to its inputs
        grads = [None] * len(leaves)
    grads = [
        torch.zeros_like(v) if g is None else g for v, g in zip(leaves.values(), grads, strict=True)
    ]
    return [out.detach(), *grads]


def assert_close_to_reference(fast: list, ref_same_dtype: list, ref64: list, names: list) -> None:
    for name, f, r, r64 in zip(names, fast, ref_same_dtype, ref64, strict=True):
        assert f.shape == r64.shape, f"{name}: shape {tuple(f.shape)} != {tuple(r64.shape)}"
        assert f.dtype == r.dtype, f"{name}: dtype {f.dtype} != {r.dtype}"
        if r64.numel() == 0:
            continue
        f64, rr64 = f.double().cpu(), r64.double().cpu()
        err_ref = (r.double().cpu() - rr64).abs().max().item()
        err_fast = (f64 - rr64).abs().max().item()
        floor = 32 * torch.finfo(f.dtype).eps * max(1.0, rr64.abs().max().item())
        assert err_fast <= 2 * err_ref + floor, (
            f"{name}: fast error {err_fast:.3g} > 2 x reference error {err_ref:.3g} + {floor:.3g}"
        )


def check_matmul_case(case: Case, backend: str, device="cpu") -> None:
    inputs = make_inputs(case, "matmul", device)
    names = ["out", "x", "w"] + (["gates"] if case.gated else [])
    fast = outputs_and_grads(moe_kernels.expert_matmul, inputs, case.seed, backend=backend)
    ref = outputs_and_grads(moe_kernels.expert_matmul_naive, inputs, case.seed)
    ref64 = outputs_and_grads(moe_kernels.expert_matmul_naive, inputs, case.seed, torch.float64)
    assert_close_to_reference(fast, ref, ref64, names)


def check_mlp_case(case: Case, backend: str, device="cpu") -> None:
    inputs = make_inputs(case, "mlp", device)
    names = ["out", "x", "w1", "w2", "gates"] + (["w3"] if "w3" in inputs else [])
    kw = dict(activation=case.activation)
    fast = outputs_and_grads(moe_kernels.expert_mlp, inputs, case.seed, backend=backend, **kw)
    ref = outputs_and_grads(moe_kernels.expert_mlp_naive, _rename(inputs), case.seed, **kw)
    ref64 = outputs_and_grads(
        moe_kernels.expert_mlp_naive, _rename(inputs), case.seed, torch.float64, **kw
    )
    assert_close_to_reference(fast, ref, ref64, names)


def check_mlp_forward_case(case: Case, backend: str, device="cpu") -> None:
    """The output alone, computed without autograd (the forward-only paths)."""
    inputs = make_inputs(case, "mlp", device)
    kw = dict(activation=case.activation)
    with torch.no_grad():
        fast = moe_kernels.expert_mlp(**inputs, backend=backend, **kw)
        ref = moe_kernels.expert_mlp_naive(**_rename(inputs), **kw)
        ref64 = moe_kernels.expert_mlp_naive(
            **{k: v.double() if v.is_floating_point() else v for k, v in _rename(inputs).items()},
            **kw,
        )
    assert_close_to_reference([fast], [ref], [ref64], ["out"])


def _rename(inputs: dict) -> dict:
    """expert_mlp_naive spells its arguments with shape suffixes (and in the same order)."""
    renamed = dict(
        x_TD=inputs["x"],
        w1_EDG=inputs["w1"],
        w2_EGD=inputs["w2"],
        idx_TK=inputs["idx"],
        gates_TK=inputs["gates"],
    )
    if "w3" in inputs:
        renamed["w3_EDG"] = inputs["w3"]
    return renamed


@pytest.fixture(scope="session")
def kt() -> SimpleNamespace:
    return SimpleNamespace(
        Case=Case,
        TRITON_DTYPES=TRITON_DTYPES,
        TRITON_DEVICE=TRITON_DEVICE,
        cases=cases,
        make_inputs=make_inputs,
        check_matmul_case=check_matmul_case,
        check_mlp_case=check_mlp_case,
        check_mlp_forward_case=check_mlp_forward_case,
    )
