"""`moe-train` with torch.compile's backend set to aot_eager (dynamo and AOT autograd, without
inductor's code generation, which takes minutes on a small CI machine): run by
test_distributed.py under torchrun (pytest does not collect it). Each rank prints the number of
modules compiled."""

import sys

import torch
from moe_train.cli import main

compile_module, compiled = torch.nn.Module.compile, []


def compile_with_aot_eager(self, *args, **kwargs):
    compiled.append(type(self).__name__)
    compile_module(self, *args, backend="aot_eager", **kwargs)


torch.nn.Module.compile = compile_with_aot_eager
rc = main(sys.argv[1:])
print(f"rank compiled {len(compiled)} modules: {', '.join(compiled)}", file=sys.stderr)
sys.exit(rc)
