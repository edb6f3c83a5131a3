"""Runs `moe-train train ARGS` and writes what this rank held at its second step to OUT (JSON,
one file per rank: OUT.rank<R>): the bytes of its parameters, gradients and AdamW state (sums of
the local tensors: a DTensor's `to_local()`), and the peak of the CPU allocator during the
second step's forward and backward, relative to its start, from the torch profiler's memory
events ("Total Allocated"; blocks allocated before the window and freed in it are not
subtracted, so the peak is what the step allocated on top of what it found).

Usage: python memory_probe.py OUT -- moe-train train arguments
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.profiler import ProfilerActivity, profile


def local_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size()


def main() -> None:
    out = Path(sys.argv[1])
    argv = sys.argv[sys.argv.index("--") + 1 :]
    found: dict = {}
    steps = {"n": 0}
    window: dict = {}

    def params(opt):
        return [p for g in opt.param_groups for p in g["params"]]

    def pre(opt, args, kwargs):
        steps["n"] += 1
        if steps["n"] == 2:
            window["prof"].stop()
            found["gradients"] = sum(local_bytes(p.grad) for p in params(opt) if p.grad is not None)
            found["peak"] = _peak(window["prof"])

    def post(opt, args, kwargs):
        if steps["n"] == 1:
            found["parameters"] = sum(local_bytes(p) for p in params(opt))
            found["optimizer"] = sum(
                local_bytes(v)
                for state in opt.state.values()
                for v in state.values()
                if isinstance(v, torch.Tensor)
            )
            window["prof"] = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            window["prof"].start()

    register_optimizer_step_pre_hook(pre)
    register_optimizer_step_post_hook(post)
    from moe_train.cli import main as cli

    rc = cli(argv)
    rank = os.environ.get("RANK", "0")
    Path(f"{out}.rank{rank}").write_text(json.dumps({"rc": rc, **found}))
    sys.exit(rc)


def _peak(prof) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


if __name__ == "__main__":
    main()
