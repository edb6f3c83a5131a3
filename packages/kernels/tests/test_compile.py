"""The custom ops under torch.compile: registrations checked by torch.library.opcheck, fullgraph
compilation of expert_mlp and expert_matmul on the CPU with outputs and gradients equal to eager,
and a new token count adding at most one recompilation and no graph break."""

import moe_kernels
import pytest
import torch
from moe_kernels.expert_matmul.gathered import expert_mlp_chosen_op, expert_mlp_gathered_op
from moe_kernels.expert_matmul.ops import expert_matmul_op, expert_mlp_op
from moe_kernels.routing.dispatch import sort_by_expert_op
from torch._dynamo.testing import CompileCounterWithBackend

D, G, E, K = 8, 16, 4, 2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(T, D, generator=gen),
        torch.randn(E, D, G, generator=gen) / D**0.5,
        torch.randn(E, G, D, generator=gen) / G**0.5,
        torch.rand(T, E, generator=gen).argsort(1)[:, :K],
        torch.rand(T, K, generator=gen),
    ]


def _mlp(x, w1, w2, idx, gates):
    return moe_kernels.expert_mlp(torch.tanh(x), w1, w2, idx, gates, "gelu") * 2


def _swiglu(x, w1, w2, idx, gates):
    return moe_kernels.expert_mlp(x, w1, w2, idx, gates, "swiglu", w3=w1.flip(2) * 0.5)


def _matmul(x, w1, w2, idx, gates):
    y_TKG = moe_kernels.expert_matmul(x.unsqueeze(1).expand(-1, K, -1), w1, idx)
    return moe_kernels.expert_matmul(torch.relu(y_TKG), w2, idx, gates)


def _outputs_and_grads(fn, inputs):
    leaves = [t.clone().requires_grad_() if t.dtype.is_floating_point else t for t in inputs]
    y = fn(*leaves)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return [y.detach()] + [t.grad for t in leaves if t.dtype.is_floating_point]


def _check_against_eager(fn, compile_backend, token_counts=(7, 11, 13), dynamic=None):
    counter = CompileCounterWithBackend(compile_backend)
    compiled = torch.compile(fn, fullgraph=True, backend=counter, dynamic=dynamic)
    for T in token_counts:
        inputs = _inputs(T, seed=T)
        for got, want in zip(
            _outputs_and_grads(compiled, inputs), _outputs_and_grads(fn, inputs), strict=True
        ):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    return counter.frame_count


@pytest.mark.parametrize("fn", [_mlp, _swiglu, _matmul])
def test_fullgraph_compile_matches_eager(fn):
    # the first call compiles for static shapes, the second recompiles with T dynamic, then none
    assert _check_against_eager(fn, "aot_eager") <= 2


def _gated_matmul(x, w1, w2, idx, gates):
    return moe_kernels.expert_matmul(x, w1, idx, gates)


def test_inductor_compile_matches_eager():
    """One compilation (dynamic shapes from the start; inductor is slow to compile on 2 cores)."""
    assert _check_against_eager(_gated_matmul, "inductor", token_counts=(7, 11), dynamic=True) == 1


@pytest.mark.parametrize("fn", [_mlp, _matmul])
def test_dynamo_sees_the_ops_without_graph_break(fn):
    explained = torch._dynamo.explain(fn)(*_inputs(5))
    assert explained.graph_break_count == 0
    ops = {str(op) for graph_ops in explained.ops_per_graph for op in graph_ops}
    assert any(op.startswith("moe_kernels.") for op in ops), ops


OPCHECKS = [
    (expert_mlp_op, lambda x, w1, w2, idx, g: (x, w1, w2, None, idx, g, "silu", "torch_padded")),
    (expert_mlp_op, lambda x, w1, w2, idx, g: (x, w1, w2, None, idx, g, "relu", "torch_grouped")),
    (expert_mlp_op, lambda x, w1, w2, idx, g: (x, w1, w2, w1.flip(0), idx, g, "swiglu", "torch")),
    (expert_matmul_op, lambda x, w1, w2, idx, g: (x, w1, idx, g, "torch")),
    (
        expert_matmul_op,
        lambda x, w1, w2, idx, g: (x.unsqueeze(1).repeat(1, K, 1), w1, idx, None, "torch_grouped"),
    ),
    (sort_by_expert_op, lambda x, w1, w2, idx, g: (idx, E, "torch")),
]


def test_small_batch_path_compiles_fullgraph():
    """Decoding: one token under no_grad takes a small-batch op (the CPU's: 'chosen'), traced
    whole."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_swiglu, fullgraph=True, backend=counter)
    with torch.no_grad():
        for T in (1, 1):
            inputs = _inputs(T, seed=T)
            torch.testing.assert_close(compiled(*inputs), _swiglu(*inputs), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


@pytest.mark.parametrize("op", [expert_mlp_gathered_op, expert_mlp_chosen_op])
def test_small_batch_op_registration(op):
    x, w1, w2, idx, gates = _inputs(2)
    torch.library.opcheck(op, (x, w1, w2, w1.flip(0), idx, gates, "swiglu"))


def _opcheck(op, args):
    args = [
        t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in args
    ]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize(("op", "make_args"), OPCHECKS)
def test_op_registrations(op, make_args):
    """Schema, fake implementation (shapes, dtypes, strides), autograd and AOT tracing with
    dynamic shapes, forward and backward ops."""
    _opcheck(op, make_args(*_inputs(6)))


@pytest.mark.triton
@pytest.mark.parametrize("op", [expert_mlp_op, expert_matmul_op])
def test_op_registrations_on_the_triton_path(op):
    x, w1, w2, idx, gates = _inputs(6)
    if op is expert_mlp_op:
        _opcheck(op, (x, w1, w2, None, idx, gates, "relu", "triton"))
        _opcheck(op, (x, w1, w2, w1.flip(0), idx, gates, "swiglu", "triton"))
    else:
        _opcheck(op, (x, w1, idx, gates, "triton"))
