"""The layers' own custom op (balanced_assignment) does not import torch's compiler eagerly."""

import subprocess
import sys

SCRIPT = """
import sys
import torch
from moe_layers.base_layer import balanced_assignment

scores = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
owner = balanced_assignment(scores)
assert "torch._dynamo" not in sys.modules, "balanced_assignment imported torch._dynamo"
import torch._dynamo
torch.testing.assert_close(balanced_assignment(scores), owner)
print("ok")
"""


def test_balanced_assignment_does_not_import_the_compiler():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
