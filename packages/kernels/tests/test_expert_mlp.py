"""expert_mlp: the fused two-matmul path against two reference expert matmuls with the activation
between, outputs and gradients of x, w1, w2 and gates."""

import moe_kernels
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_kernels.expert_matmul import gathered, ops


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


@pytest.mark.parametrize("backend", ["gather", "chosen"])
@given(data=st.data())
def test_small_batch_paths_match_reference(data, kt, backend):
    """The forward-only small-batch paths: 'gather' (the chosen experts' weights gathered, one bmm
    each) and 'chosen' (each chosen expert's weights read in place)."""
    kt.check_mlp_forward_case(data.draw(kt.cases(max_T=6)), backend)


@given(data=st.data())
def test_auto_without_gradients_matches_reference(data, kt):
    """'auto' under no_grad on the CPU: the 'chosen' path for T * K <= E, the sorted path above."""
    kt.check_mlp_forward_case(data.draw(kt.cases(max_T=12, max_E=16)), "auto")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_auto_takes_a_small_batch_path_only_for_few_rows_without_gradients(device):
    """On the CPU 'chosen' up to T * K = E; elsewhere (here the meta device, standing in for
    CUDA) 'gather' up to T * K = E / 2; neither with a gradient to compute."""
    op, limit = (
        (gathered.expert_mlp_chosen_op, 8)
        if device == "cpu"
        else (gathered.expert_mlp_gathered_op, 4)
    )
    for T, K in [(1, 2), (2, 2), (3, 2), (4, 2), (5, 2)]:
        x, idx = torch.randn(T, 5, device=device), torch.zeros(T, K, dtype=torch.long)
        w1 = torch.randn(8, 5, 6, device=device)
        with torch.no_grad():
            taken = gathered.small_batch_path("auto", x, idx, 8, w1)
        assert taken is (op if T * K <= limit else None), (T, K)
        assert gathered.small_batch_path("auto", x.requires_grad_(), idx, 8, w1) is None


@pytest.mark.parametrize("backend", ["gather", "chosen"])
def test_small_batch_paths_refuse_gradients(backend):
    args = _good()
    args["w1"].requires_grad_()
    with pytest.raises(ValueError, match=f"'{backend}' is forward-only.*w1"):
        moe_kernels.expert_mlp(**args, backend=backend)


def test_chosen_path_names_ids_out_of_range():
    args = _good(E=4)
    args["idx"][1, 0] = 4
    with pytest.raises(ValueError, match=r"expert ids in \[0, 4\], outside \[0, 4\)"):
        moe_kernels.expert_mlp(**args, backend="chosen")


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
