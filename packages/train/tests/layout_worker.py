"""The per-rank body of test_distributed.py's layout test, run by torchrun with 4 processes (a
script of its own: pytest does not collect it).

For each tiny preset and each of its 4-rank layouts, two AdamW steps with gradient clipping, in
fp64, on a global batch of which each rank takes its slice, are compared with the same steps of
the unsharded model on one process (run once per preset), which runs the ranks' slices one after
the other and averages their losses (what data parallelism computes: routing, capacity and
auxiliary losses are per rank). Losses and every updated weight agree to fp64 rounding (rtol
1e-9), except those of BASE and tMoE (rtol 1e-5): their balanced assignment computes its scores
in fp32. tiny-moeut runs one shared layer (one FSDP2 unit) twice per forward
(moeut_group_size=1), resharded after each application's forward: its gradient must be the sum
over both. Then the bytes of parameters, gradients and AdamW state one rank holds at dp_shard=4
are compared with the unsharded model's: at most 30%.
"""

from __future__ import annotations

import copy
import sys

import moe_models
import torch
import torch.distributed as dist
from moe_train.build import build_optimizer
from moe_train.config import TrainConfig
from moe_train.parallelize import (
    Layout,
    build_mesh,
    clip_grad_norm_,
    parallelize,
    scale_expert_grads,
)
from torch.distributed.tensor import DTensor

LAYOUTS = (Layout(1, 4, 1), Layout(1, 4, 2), Layout(2, 2, 2), Layout(1, 4, 4))
# HASH and tMoE route differently but shard as the others do: the two layouts with ep and FSDP2
PRESETS = {
    **dict.fromkeys(("tiny-sigma-moe", "tiny-switch", "tiny-gshard", "tiny-base"), LAYOUTS),
    **dict.fromkeys(("tiny-sbase", "tiny-moeut"), LAYOUTS),
    **dict.fromkeys(("tiny-hash", "tiny-smlp"), LAYOUTS[1:3]),
}
SMALL = dict(d_model=16, n_layers=2, n_heads=2, seq_len=8, d_ff=24, n_experts=4, expert_size=8)
PER_PRESET = {"tiny-moeut": dict(moeut_group_size=1), "tiny-smlp": dict(smlp_d_ff=16)}
PER_RANK, STEPS = 2, 2
RTOL = {"tiny-base": 1e-5, "tiny-smlp": 1e-5}


def config(preset: str):
    ffn = moe_models.get_config(preset).ffn
    over = {k: v for k, v in SMALL.items() if k not in ("n_experts", "expert_size")}
    over.update({k: v for k, v in SMALL.items() if hasattr(ffn, k)})
    if hasattr(ffn, "capacity_factor"):
        over["capacity_factor"] = 0.5  # tokens dropped
    over.update(PER_PRESET.get(preset, {}))
    return moe_models.get_config(preset, dropout=0.0, vocab_size=37, **over)


def batches(cfg, world: int):
    gen = torch.Generator().manual_seed(7)
    shape = (STEPS, world * PER_RANK, cfg.seq_len)
    tokens = torch.randint(cfg.vocab_size, shape, generator=gen)
    return tokens, torch.roll(tokens, -1, dims=-1)


def step(model, optimizer, inputs, targets, ep: int, train) -> torch.Tensor:
    out = model(inputs, targets)
    out.loss.backward()
    scale_expert_grads(model, ep)
    clip_grad_norm_(model, train.grad_clip)
    optimizer.step()
    return out.loss.detach()


def reference(model, train, inputs, targets, world: int):
    """The unsharded steps: per step the mean of the ranks' slice losses."""
    optimizer = build_optimizer(model, train)
    losses = []
    for s in range(STEPS):
        total = 0
        for r in range(world):
            part = slice(r * PER_RANK, (r + 1) * PER_RANK)
            total = total + model(inputs[s, part], targets[s, part]).loss / world
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total.detach())
    return losses, optimizer


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def state_bytes(model, optimizer) -> int:
    """Bytes of this rank's parameters, gradients and optimiser state."""
    total = 0
    for p in model.parameters():
        total += local(p).nbytes + (local(p.grad).nbytes if p.grad is not None else 0)
    for state in optimizer.state.values():
        total += sum(local(v).nbytes for v in state.values() if isinstance(v, torch.Tensor))
    return total


def check_preset(preset: str, rank: int, world: int) -> None:
    train = TrainConfig(grad_clip=0.05)
    cfg = config(preset)
    torch.manual_seed(0)
    plain = moe_models.build(cfg).double().train()
    inputs, targets = batches(cfg, world)
    ref_model = copy.deepcopy(plain)
    ref_losses, _ = reference(ref_model, train, inputs, targets, world)
    expected = dict(ref_model.named_parameters())
    for layout in PRESETS[preset]:
        model, optimizer, losses = run(layout, plain, train, inputs, targets, rank, world)
        where = f"{preset} {layout.describe()}"
        rtol = RTOL.get(preset, 1e-9)
        check_losses_and_weights(model, losses, ref_losses, expected, rtol, where)
        if layout == Layout(1, 4, 1) and preset == "tiny-sigma-moe":
            check_memory(plain, train, inputs, targets, model, optimizer, world)
    if rank == 0:
        print(f"{preset}: {len(PRESETS[preset])} layouts match one process", file=sys.stderr)


def run(layout, plain, train, inputs, targets, rank, world):
    """The sharded steps on this rank: the model, its optimiser and the steps' mean losses."""
    model = copy.deepcopy(plain)
    parallelize(model, build_mesh(layout, torch.device("cpu")), layout, train)
    optimizer = build_optimizer(model, train)
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    losses = []
    for s in range(STEPS):
        loss = step(model, optimizer, inputs[s, part], targets[s, part], layout.ep, train)
        dist.all_reduce(loss)
        losses.append(loss / world)
        if s < STEPS - 1:
            optimizer.zero_grad(set_to_none=True)
    return model, optimizer, losses


def check_losses_and_weights(model, losses, ref_losses, expected, rtol, where) -> None:
    for s, (loss, want) in enumerate(zip(losses, ref_losses, strict=True)):
        at = f"{where} step {s + 1}"
        torch.testing.assert_close(loss, want, rtol=rtol, atol=0, msg=lambda m, w=at: f"{w}: {m}")
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            full(p), expected[name], rtol=rtol, atol=rtol * 1e-3, msg=f"{where}: {name}"
        )


def check_memory(plain, train, inputs, targets, model, optimizer, world) -> None:
    one = copy.deepcopy(plain)
    _, one_optimizer = reference(one, train, inputs, targets, world)
    # the reference zeroed its gradients after its last step; give it the sharded run's
    for p in one.parameters():
        p.grad = torch.zeros_like(p)
    ratio = state_bytes(model, optimizer) / state_bytes(one, one_optimizer)
    print(f"dp_shard=4: per-rank state bytes {ratio:.1%} of one process", file=sys.stderr)
    assert ratio <= 0.30, ratio


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for preset in PRESETS:
            check_preset(preset, rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
