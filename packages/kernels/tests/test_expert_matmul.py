"""expert_matmul: every backend against the loop-over-experts reference, outputs and gradients."""

import moe_kernels
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize("backend", ["torch_grouped", "torch_padded"])
@given(data=st.data())
def test_torch_backends_match_reference(data, kt, backend):
    kt.check_matmul_case(data.draw(kt.cases()), backend)


@given(data=st.data())
def test_auto_backend_on_cpu_matches_reference(data, kt):
    kt.check_matmul_case(data.draw(kt.cases(dtypes=[torch.float32])), "auto")


@given(data=st.data())
def test_grouped_mm_sizes_match_reference(data, kt):
    """Sizes where the grouped layout takes torch._grouped_mm rather than its per-expert loop."""
    kt.check_matmul_case(data.draw(kt.cases(aligned=True)), "torch_grouped")


@pytest.mark.triton
@given(data=st.data())
def test_triton_kernels_match_reference(data, kt):
    case = data.draw(kt.cases(max_T=12, max_d=20, max_E=5, dtypes=kt.TRITON_DTYPES))
    kt.check_matmul_case(case, "triton", device=kt.TRITON_DEVICE)


@pytest.mark.gpu
@given(data=st.data())
def test_triton_on_cuda_matches_reference(data, kt):
    case = data.draw(kt.cases(max_T=300, max_d=160, max_E=16, dtypes=kt.TRITON_DTYPES))
    kt.check_matmul_case(case, "auto", device="cuda")


def test_edge_shapes_single_token_and_all_experts(kt):
    """T = 1 with K = E: every expert gets exactly one row."""
    case = kt.Case(1, 3, 5, 4, 4, 4, torch.float32, 7, False, True, False, False)
    kt.check_matmul_case(case, "torch")


def _good(T=3, K=2, E=4, d_in=5, d_out=6):
    return dict(
        x=torch.randn(T, d_in),
        w=torch.randn(E, d_in, d_out),
        idx=torch.arange(T * K).view(T, K) % E,
        gates=torch.rand(T, K),
    )


@pytest.mark.parametrize(
    ("change", "name"),
    [
        (dict(idx=torch.tensor([[0, 4], [1, 2], [3, 0]])), "idx"),
        (dict(idx=torch.tensor([[0, -1], [1, 2], [3, 0]])), "idx"),
        (dict(idx=torch.zeros(3, 2)), "idx"),
        (dict(idx=torch.zeros(3, 5, dtype=torch.long)), "idx"),
        (dict(x=torch.randn(4, 5)), "x"),
        (dict(x=torch.randn(3, 2, 6)), "x"),
        (dict(x=torch.randn(3, 5, dtype=torch.float64)), "x"),
        (dict(w=torch.randn(4, 5)), "w"),
        (dict(gates=torch.rand(3, 3)), "gates"),
        (dict(gates=torch.rand(3, 2, dtype=torch.float64)), "gates"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(change, name):
    args = {**_good(), **change}
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        moe_kernels.expert_matmul(**args)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        moe_kernels.expert_matmul(**_good(), backend="cuda")
