"""The per-rank body of bench_layouts.py, run by torchrun with 4 gloo processes (CPU).

Builds tiny-sigma-moe (d_model 128, 4 layers, 16 experts) once per layout, plus today's old
path (DistributedDataParallel over the whole model) and the 1-process step (rank 0 alone on the
whole global batch; the others wait), then times their optimiser steps round-robin, so that the
machine's noise hits all alike. Rank 0 prints one JSON line per layout: median step time and
the bytes of parameters, gradients and AdamW state a rank holds (the largest over the ranks).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time

import moe_models
import torch
import torch.distributed as dist
from moe_train.config import TrainConfig
from moe_train.parallelize import (
    Layout,
    build_mesh,
    clip_grad_norm_,
    parallelize,
    scale_expert_grads,
)
from moe_train.trainer import build_optimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

LAYOUTS = {
    "dp_shard=4": Layout(1, 4, 1),
    "dp_shard=4 ep=2": Layout(1, 4, 2),
    "dp_replicate=2 dp_shard=2 ep=2": Layout(2, 2, 2),
    "ep=4": Layout(1, 4, 4),
}
PER_RANK = 4


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def state_bytes(model, optimizer) -> int:
    total = sum(local(p).nbytes * 2 for p in model.parameters())  # weights and gradients
    for state in optimizer.state.values():
        total += sum(local(v).nbytes for v in state.values() if isinstance(v, torch.Tensor))
    return total


def main(repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = moe_models.get_config("tiny-sigma-moe", n_experts=16, expert_size=32, dropout=0.0)
    torch.manual_seed(0)
    plain = moe_models.build(cfg).train()
    train = TrainConfig()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(cfg.vocab_size, (world * PER_RANK, cfg.seq_len + 1), generator=gen)
    mine = tokens[rank * PER_RANK : (rank + 1) * PER_RANK]

    runs = {}
    one = copy.deepcopy(plain)
    runs["1 process"] = (one, build_optimizer(one, train), 1, tokens, rank == 0)
    ddp_model = copy.deepcopy(plain)
    ddp = DistributedDataParallel(ddp_model)
    runs["old DDP"] = (ddp, build_optimizer(ddp_model, train), 1, mine, True)
    for name, layout in LAYOUTS.items():
        model = copy.deepcopy(plain)
        parallelize(model, build_mesh(layout, torch.device("cpu")), layout, train)
        runs[name] = (model, build_optimizer(model, train), layout.ep, mine, True)

    def step(model, optimizer, ep, batch):
        out = model(batch[:, :-1], batch[:, 1:])
        out.loss.backward()
        scale_expert_grads(model, ep)
        clip_grad_norm_(model, train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    samples = {name: [] for name in runs}
    for i in range(repeats + 1):
        for name, (model, optimizer, ep, batch, active) in runs.items():
            dist.barrier()
            start = time.perf_counter()
            if active:
                step(model, optimizer, ep, batch)
            dist.barrier()
            if i:  # the first round warms up
                samples[name].append((time.perf_counter() - start) * 1e3)
    for name, (model, optimizer, _, _, active) in runs.items():
        held = torch.tensor(float(state_bytes(model, optimizer) if active else 0))
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
        if rank == 0:
            row = {
                "layout": name,
                "step_ms_median": statistics.median(samples[name]),
                "state_MiB_per_rank": held.item() / 2**20,
            }
            print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
