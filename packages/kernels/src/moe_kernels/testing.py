"""HostReads: a dispatch mode that records the aten ops which read device data back to the host.

On CUDA each of these waits for the device (a synchronisation): reading a value (item, int(t),
bool(t), tolist, numpy), ops whose output size depends on the data (nonzero, masked_select,
unique, boolean-mask indexing, repeat_interleave without output_size), bincount (it reads the
largest id), and copies from a device to the CPU. Run on CPU tensors, the mode finds in the code
that would run on CUDA what would synchronise there. tolist and numpy read CPU tensors without
an aten call, so a torch-function mode beside it records those; one_hot with num_classes reads
only on the CPU and is not counted. It descends into the moe_kernels
custom ops (a mode sees an op, not the aten ops inside), running their bodies under itself.

    with HostReads() as reads:
        loss = model(x).sum()
        loss.backward()
    assert not reads.ops, reads.ops

With into_ops=False the moe_kernels ops are not entered: on CPU tensors a layer's own routing
code can then be checked while its experts run the CPU fast path.
"""

import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import moe_kernels
from moe_kernels.library import BODIES, NAMESPACE

aten = torch.ops.aten

_ALWAYS = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.nonzero_numpy.default,
    aten.argwhere.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
}
_REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_INDEXING = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def reads_host(func, args, kwargs) -> bool:
    """Whether this aten call reads device data on the host (see the module docstring)."""
    if func in _ALWAYS:
        return True
    if func in _REPEAT_INTERLEAVE:
        return kwargs.get("output_size") is None
    if func in _INDEXING:
        return any(_is_mask(i) for i in args[1] if i is not None)
    if func is aten._to_copy.default:
        to_cpu = kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
        return to_cpu and args[0].device.type != "cpu"
    if func is aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


class _ValueReads(TorchFunctionMode):
    """The reads that bypass dispatch (tolist, numpy of CPU tensors), and one_hot with
    num_classes given: on CUDA it leaves the range check to a device assert, on the CPU it reads
    min and max, which the dispatch mode must then not count."""

    def __init__(self, owner: "HostReads"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            self.owner.ops.append(f"Tensor.{func.__name__}")
        num_classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
        if func is F.one_hot and num_classes >= 0:
            self.owner.quiet += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.owner.quiet -= 1
        return func(*args, **kwargs)


class HostReads(TorchDispatchMode):
    """Records in `ops` the name of every call that reads device data on the host.

    into_ops=False treats the moe_kernels ops as opaque: for checking the code around them on CPU
    tensors, where the ops run their CPU fast path (which reads the host; on CUDA they do not).
    """

    def __init__(self, into_ops: bool = True):
        super().__init__()
        self.into_ops = into_ops
        self.ops: list[str] = []
        self.quiet = 0  # inside an op that reads on the CPU only
        self._values = _ValueReads(self)

    def __enter__(self):
        self._values.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._values.__exit__(None, None, None)
            raise

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            super().__exit__(exc_type, exc_value, traceback)
        finally:
            self._values.__exit__(exc_type, exc_value, traceback)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == NAMESPACE and self.into_ops:
            with self:
                return BODIES[func.name().removeprefix(f"{NAMESPACE}::")](*args, **kwargs)
        if not self.quiet and reads_host(func, args, kwargs):
            self.ops.append(str(func))
        return func(*args, **kwargs)


def force_backend(monkeypatch, backend: str) -> None:
    """Every later call of moe_kernels.expert_mlp and moe_kernels.expert_matmul through the module
    (as the layers call them) takes `backend`, e.g. "triton" on CPU tensors under
    TRITON_INTERPRET=1: the path CUDA takes. `monkeypatch` is pytest's fixture, which undoes it
    after the test."""
    for name in ("expert_mlp", "expert_matmul"):
        fn = getattr(moe_kernels, name)
        monkeypatch.setattr(moe_kernels, name, functools.partial(fn, backend=backend))
