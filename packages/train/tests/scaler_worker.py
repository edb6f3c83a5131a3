"""The per-rank body of test_distributed.py's fp16 test, run by torchrun with 2 processes (pytest
does not collect it).

The grad scaler the trainer uses under torchrun (moe_train.parallelize.grad_scaler: torch's
ShardedGradScaler), with the experts sharded over both ranks and the rest under FSDP2
(dp_shard=2, ep=2): three steps against the same steps on one process with torch.amp.GradScaler,
which runs the ranks' slices one after the other. At step 2 one expert gradient overflows on
rank 1 only (on one process: the same expert's gradient): both ranks skip the step and halve the
scale, as the one process does. Run twice: in fp64 with the loss scaled, where the losses and
updated weights equal the one process's (rtol 1e-9), and in fp32 under fp16 autocast on the
CPU, where the losses are finite and within fp16 rounding of the one process's (rtol 2e-3; the
weights are not compared: AdamW's first steps are about the signs of the gradients, which fp16
rounding flips where they are near zero). The scaler's state is the same on both ranks and
loads into a fresh scaler (a resumed run's).
"""

from __future__ import annotations

import contextlib
import copy

import moe_models
import torch
import torch.distributed as dist
from moe_train.build import build_optimizer
from moe_train.config import TrainConfig
from moe_train.parallelize import (
    Layout,
    build_mesh,
    clip_grad_norm_,
    grad_scaler,
    parallelize,
    scale_expert_grads,
)
from torch.distributed.tensor import DTensor

STEPS, OVERFLOW_STEP, PER_RANK, EXPERTS = 3, 2, 2, "layers.0.ffn.ffn.experts.w1"
TRAIN = TrainConfig(grad_clip=1.0)
CPU = torch.device("cpu")


def config():
    return moe_models.get_config(
        "tiny-sigma-moe", dropout=0.0, vocab_size=37, d_model=16, n_layers=2, n_heads=2,
        seq_len=8, d_ff=24, n_experts=4, expert_size=8,
    )  # fmt: skip


def precision(fp16: bool):
    return torch.autocast("cpu", dtype=torch.float16) if fp16 else contextlib.nullcontext()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def overflow(model, rank: int) -> None:
    """inf in the first weight of expert 2 of 4 (the first of rank 1's shard)."""
    grad = dict(model.named_parameters())[EXPERTS].grad
    if isinstance(grad, DTensor):
        if rank == 1:
            grad.to_local().view(-1)[0] = float("inf")
    else:
        grad[2].view(-1)[0] = float("inf")


def one_process(plain, tokens, world: int, fp16: bool):
    model = copy.deepcopy(plain)
    optimizer = build_optimizer(model, TRAIN)
    scaler = grad_scaler("fp16", CPU, distributed=False)
    losses, scales = [], []
    for s in range(STEPS):
        total = 0
        for r in range(world):
            part = tokens[s, r * PER_RANK : (r + 1) * PER_RANK]
            with precision(fp16):
                total = total + model(part, part.roll(-1, -1)).loss / world
        scaler.scale(total).backward()
        if s + 1 == OVERFLOW_STEP:
            overflow(model, rank=0)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total.detach())
        scales.append(scaler.get_scale())
    return model, losses, scales


def sharded(plain, tokens, rank: int, world: int, fp16: bool, ref_losses, ref_scales):
    layout = Layout(1, 2, 2)
    model = parallelize(copy.deepcopy(plain), build_mesh(layout, CPU), layout, TRAIN)
    optimizer = build_optimizer(model, TRAIN)
    scaler = grad_scaler("fp16", CPU, distributed=True)
    assert type(scaler).__name__ == "ShardedGradScaler"
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for s in range(STEPS):
        inputs = tokens[s, part]
        with precision(fp16):
            loss = model(inputs, inputs.roll(-1, -1)).loss
        scaler.scale(loss).backward()
        scale_expert_grads(model, layout.ep)
        if s + 1 == OVERFLOW_STEP:
            overflow(model, rank)
        scaler.unscale_(optimizer)
        clip_grad_norm_(model, TRAIN.grad_clip)
        before = {n: full(p).detach().clone() for n, p in model.named_parameters()}
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach()
        dist.all_reduce(mean)
        mean /= world
        assert torch.isfinite(mean), (s, mean)
        torch.testing.assert_close(mean, ref_losses[s], rtol=2e-3 if fp16 else 1e-9, atol=0)
        assert scaler.get_scale() == ref_scales[s], (s, scaler.get_scale(), ref_scales)
        moved = any(not torch.equal(before[n], full(p)) for n, p in model.named_parameters())
        assert moved == (s + 1 != OVERFLOW_STEP), (rank, s, moved)
    return model, scaler


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(0)
        plain = moe_models.build(config()).train()
        gen = torch.Generator().manual_seed(3)
        tokens = torch.randint(37, (STEPS, world * PER_RANK, 8), generator=gen)
        for fp16 in (False, True):
            plain = plain.float() if fp16 else plain.double()
            ref_model, ref_losses, ref_scales = one_process(plain, tokens, world, fp16)
            assert ref_scales[OVERFLOW_STEP - 1] == ref_scales[0] / 2
            model, scaler = sharded(plain, tokens, rank, world, fp16, ref_losses, ref_scales)
            if not fp16:
                expected = dict(ref_model.named_parameters())
                for name, p in model.named_parameters():
                    torch.testing.assert_close(full(p), expected[name], rtol=1e-9, atol=1e-12)
        # the scaler's state (saved by rank 0 in a checkpoint's meta) is every rank's
        states = [None] * world
        dist.all_gather_object(states, scaler.state_dict())
        assert all(state == states[0] for state in states), states
        resumed = grad_scaler("fp16", CPU, distributed=True)
        resumed.load_state_dict(states[0])
        assert resumed.state_dict() == scaler.state_dict()
        if rank == 0:
            print(f"fp16 scaler: scales {ref_scales}, step {OVERFLOW_STEP} skipped", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
