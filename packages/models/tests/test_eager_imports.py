"""Eager inference does not import torch's compiler: building each tiny preset, a forward pass
and a few generated tokens in a fresh interpreter leave torch._dynamo and torch._inductor
unimported (importing them costs seconds of a user's first token)."""

import subprocess
import sys

SCRIPT = """
import sys
import moe_models, torch

for name in [n for n in moe_models.presets() if n.startswith("tiny-")]:
    model = moe_models.build(moe_models.get_config(name, seq_len=8, mem_len=8))
    prompt = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    model(prompt).logits.sum().backward()
    moe_models.generate(model, prompt, 3, greedy=True)
    for compiler in ("torch._dynamo", "torch._inductor"):
        assert compiler not in sys.modules, f"{name}: eager use imported {compiler}"
print("ok")
"""


def test_eager_forward_and_generation_do_not_import_the_compiler():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
