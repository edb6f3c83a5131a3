"""expert_mlp: the fused two-matmul path against two reference expert matmuls with the activation
between, outputs and gradients of x, w1, w2 and gates."""

import moe_kernels
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_kernels.expert_matmul import ops


@pytest.mark.parametrize("backend", ["torch_grouped", "torch_padded"])
@given(data=st.data())
def test_torch_backends_match_reference(data, kt, backend):
    kt.check_mlp_case(data.draw(kt.cases()), backend)


@pytest.mark.parametrize("backend", ["torch_grouped", "torch_padded"])
@given(data=st.data())
def test_token_chunks_match_reference(data, kt, backend):
    """The torch backend's MLP in chunks of a few tokens (forward, and backward sorting each
    chunk again and recomputing its hidden rows), as it runs at large T."""
    case = data.draw(kt.cases())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "MIN_ROWS_PER_EXPERT", 0)
        mp.setattr(ops, "CHUNK_ROWS", data.draw(st.integers(1, 3 * case.K)))
        kt.check_mlp_case(case, backend)


@given(data=st.data())
def test_grouped_mm_sizes_match_reference(data, kt):
    """Sizes where the grouped layout takes torch._grouped_mm rather than its per-expert loop."""
    kt.check_mlp_case(data.draw(kt.cases(aligned=True)), "torch_grouped")


@given(data=st.data())
def test_small_batch_gather_path_matches_reference(data, kt):
    """backend 'gather' (forward only): the chosen experts' weights gathered, one bmm each."""
    kt.check_mlp_forward_case(data.draw(kt.cases(max_T=6)), "gather")


@given(data=st.data())
def test_auto_without_gradients_matches_reference(data, kt):
    """'auto' under no_grad: the gather path for T * K <= E / 2, the sorted path above."""
    kt.check_mlp_forward_case(data.draw(kt.cases(max_T=12, max_E=16)), "auto")


def test_auto_takes_the_gather_path_only_for_few_rows_without_gradients(monkeypatch):
    calls = []
    monkeypatch.setattr(
        moe_kernels, "expert_mlp_gathered_op", lambda *args: calls.append(args) or args[0]
    )
    args = _good(T=2, K=2, E=8)
    with torch.no_grad():
        moe_kernels.expert_mlp(**args)  # T * K = 4 = E / 2
        assert len(calls) == 1
        moe_kernels.expert_mlp(**_good(T=3, K=2, E=8))
        assert len(calls) == 1
    moe_kernels.expert_mlp(**{**args, "x": args["x"].requires_grad_()})
    assert len(calls) == 1


def test_gather_path_refuses_gradients():
    args = _good()
    args["w1"].requires_grad_()
    with pytest.raises(ValueError, match="forward-only.*w1"):
        moe_kernels.expert_mlp(**args, backend="gather")


@pytest.mark.triton
@given(data=st.data())
def test_triton_kernels_match_reference(data, kt):
    case = data.draw(kt.cases(max_T=12, max_d=20, max_E=5, dtypes=kt.TRITON_DTYPES))
    kt.check_mlp_case(case, "triton", device=kt.TRITON_DEVICE)


@pytest.mark.gpu
@given(data=st.data())
def test_triton_on_cuda_matches_reference(data, kt):
    case = data.draw(kt.cases(max_T=300, max_d=160, max_E=16, dtypes=kt.TRITON_DTYPES))
    kt.check_mlp_case(case, "auto", device="cuda")


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "swiglu"])
def test_hand_written_activation_gradients(kt, activation):
    """fp64, so the hand-written act' must match autograd's to rounding."""
    case = kt.Case(9, 6, 7, 3, 2, 3, torch.float64, 3, False, True, True, False, activation)
    kt.check_mlp_case(case, "torch")


def _good(T=3, K=2, E=4, D=5, G=6):
    return dict(
        x=torch.randn(T, D),
        w1=torch.randn(E, D, G),
        w2=torch.randn(E, G, D),
        idx=torch.arange(T * K).view(T, K) % E,
        gates=torch.rand(T, K),
    )


@pytest.mark.parametrize(
    ("change", "name"),
    [
        (dict(w2=torch.randn(4, 5, 6)), "w2"),
        (dict(w2=torch.randn(4, 6, 5, dtype=torch.float64)), "w2"),
        (dict(x=torch.randn(3, 2, 5)), "x"),
        (dict(gates=None), "gates"),
        (dict(activation="tanh"), "activation"),
        (dict(idx=torch.tensor([[0, 9], [1, 2], [3, 0]])), "idx"),
        (dict(activation="swiglu"), "w3"),
        (dict(w3=torch.randn(4, 5, 6)), "w3"),
        (dict(activation="swiglu", w3=torch.randn(4, 6, 5)), "w3"),
        (dict(activation="swiglu", w3=torch.randn(4, 5, 6, dtype=torch.float64)), "w3"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(change, name):
    args = {**_good(), **change}
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        moe_kernels.expert_mlp(**args)
