"""No device-to-host read on the code that runs on CUDA: the Triton path of expert_matmul and
expert_mlp (forward and backward, run by the interpreter on CPU tensors) and the torch routing
sort, recorded by moe_kernels.testing.HostReads; and the recorder itself finds such reads."""

import moe_kernels
import pytest
import torch
from moe_kernels.routing import sort_by_expert_torch
from moe_kernels.routing.validate import check_idx_values
from moe_kernels.testing import HostReads

T, D, G, E, K = 9, 6, 5, 4, 2


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(T, D, generator=gen).requires_grad_(),
        w1=torch.randn(E, D, G, generator=gen).requires_grad_(),
        w2=torch.randn(E, G, D, generator=gen).requires_grad_(),
        idx=torch.rand(T, E, generator=gen).argsort(1)[:, :K],
        gates=torch.rand(T, K, generator=gen).requires_grad_(),
    )


def _forward_backward(fn) -> None:
    y = fn()
    y.backward(torch.ones_like(y))


def _mlp(i, backend):
    return moe_kernels.expert_mlp(i["x"], i["w1"], i["w2"], i["idx"], i["gates"], "silu", backend)


def _swiglu(i, backend):
    w3 = i["w1"].flip(0)
    return moe_kernels.expert_mlp(
        i["x"], i["w1"], i["w2"], i["idx"], i["gates"], "swiglu", backend, w3=w3
    )


def _matmul_gated(i, backend):
    return moe_kernels.expert_matmul(i["x"], i["w1"], i["idx"], i["gates"], backend)


def _matmul_per_slot(i, backend):
    x_TKD = i["x"].unsqueeze(1).expand(T, K, D)
    return moe_kernels.expert_matmul(x_TKD, i["w1"], i["idx"], backend=backend)


CALLS = [_mlp, _swiglu, _matmul_gated, _matmul_per_slot]


@pytest.mark.parametrize(
    ("read", "expected"),
    [
        (lambda t: int(t.max()), "aten._local_scalar_dense.default"),
        (lambda t: bool(t[0]), "aten._local_scalar_dense.default"),
        (lambda t: t.tolist(), "Tensor.tolist"),
        (lambda t: t[t > 2], "aten.index.Tensor"),
        (lambda t: t.nonzero(), "aten.nonzero.default"),
        (lambda t: torch.bincount(t), "aten.bincount.default"),
        (lambda t: torch.unique(t), "aten._unique2.default"),
        (lambda t: t.repeat_interleave(t), "aten.repeat_interleave.Tensor"),
        (lambda t: torch.nn.functional.one_hot(t), "aten._local_scalar_dense.default"),
    ],
)
def test_recorder_finds_host_reads(read, expected):
    t = torch.arange(5)
    with HostReads() as reads:
        read(t)
    assert reads.ops and set(reads.ops) == {expected}


def test_recorder_passes_sync_free_ops():
    t = torch.arange(5)
    with HostReads() as reads:
        t.repeat_interleave(t, output_size=10)
        t.index_select(0, t.flip(0))
        torch.zeros(5, dtype=torch.long).scatter_add_(0, t, t)
        torch._assert_async((t >= 0).all(), "negative")
        torch.nn.functional.one_hot(t, 5).sum(0)  # reads min and max on the CPU only
    assert reads.ops == []


@pytest.mark.parametrize("call", CALLS)
def test_recorder_sees_inside_the_ops(call):
    """The CPU fast path reads ids and counts on the host (a CPU read waits for nothing): the
    recorder must see those reads inside the forward and the backward op."""
    inputs = _inputs()
    with HostReads() as forward_reads:
        y = call(inputs, "torch_padded")
    with HostReads() as backward_reads:
        y.backward(torch.ones_like(y))
    assert forward_reads.ops and backward_reads.ops


@pytest.mark.parametrize("call", CALLS)
def test_recorder_can_leave_the_ops_closed(call):
    inputs = _inputs()
    with HostReads(into_ops=False) as reads:
        _forward_backward(lambda: call(inputs, "torch_padded"))
        int(inputs["idx"].max())
    assert reads.ops == ["aten._local_scalar_dense.default"]


@pytest.mark.triton
@pytest.mark.parametrize("call", CALLS)
def test_triton_path_reads_nothing(call):
    inputs = _inputs()
    with HostReads() as reads:
        _forward_backward(lambda: call(inputs, "triton"))
    assert reads.ops == []


def test_torch_routing_sort_reads_nothing():
    """The sort and the id check as they run on CUDA, selected on CPU tensors."""
    idx = _inputs()["idx"]
    with HostReads() as reads:
        check_idx_values(idx, E, asynchronous=True)
        sort_by_expert_torch(idx, E)
    assert reads.ops == []


def test_asynchronous_id_check_still_fails():
    with pytest.raises(RuntimeError, match="idx holds expert ids outside"):
        check_idx_values(torch.tensor([[0, E]]), E, asynchronous=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("call", CALLS)
def test_cuda_path_does_not_synchronise(call, dtype):
    """On CUDA: no host read recorded and none that CUDA's sync debug mode sees, once the
    first call has autotuned the kernels (autotuning benchmarks, which synchronises)."""
    inputs = {
        name: t.detach()
        .to("cuda", dtype if t.is_floating_point() else t.dtype)
        .requires_grad_(t.requires_grad)
        for name, t in _inputs().items()
    }
    _forward_backward(lambda: call(inputs, "auto"))
    torch.cuda.synchronize()
    with HostReads() as reads:
        torch.cuda.set_sync_debug_mode("error")
        try:
            _forward_backward(lambda: call(inputs, "auto"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert reads.ops == []
