"""Eager calls of the custom ops do not import torch's compiler (torch wraps every op
implementation in a lazily built torch._dynamo.disable), and once the compiler is imported the
ops still run, eagerly and compiled."""

import subprocess
import sys

SCRIPT = """
import sys
import moe_kernels, torch

g = torch.Generator().manual_seed(0)
x = torch.randn(5, 8, generator=g, requires_grad=True)
w1 = torch.randn(4, 8, 6, generator=g, requires_grad=True)
w2 = torch.randn(4, 6, 8, generator=g, requires_grad=True)
idx = torch.tensor([[0, 1], [1, 2], [3, 3], [0, 2], [1, 0]])
gates = torch.rand(5, 2, generator=g, requires_grad=True)
y = moe_kernels.expert_mlp(x, w1, w2, idx, gates, "relu")
y.sum().backward()
moe_kernels.expert_matmul(x, w1, idx, gates)
moe_kernels.sort_by_expert(idx, 4)
assert "torch._dynamo" not in sys.modules, "eager ops imported torch._dynamo"
assert "torch._inductor" not in sys.modules, "eager ops imported torch._inductor"

import torch._dynamo
again = moe_kernels.expert_mlp(x, w1, w2, idx, gates, "relu")
torch.testing.assert_close(again, y)
compiled = torch.compile(moe_kernels.expert_mlp, backend="eager", fullgraph=True)
torch.testing.assert_close(compiled(x, w1, w2, idx, gates, "relu"), y)
print("ok")
"""


def test_eager_ops_do_not_import_the_compiler():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
