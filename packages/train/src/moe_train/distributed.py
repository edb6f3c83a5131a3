"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and small helpers.

gloo on the CPU, nccl on CUDA. Without those variables everything runs as a single process.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_train.errors import CLIError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> CUDA when there is one, else CPU; `cuda` -> this process's GPU; errors if absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"device {name!r} requested but CUDA is not available on this machine")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise CLIError(
                f"device cuda:{index} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise CLIError(f"unsupported device {name!r}; expected auto, cpu, cuda or cuda:N")
    return device


def setup(device_name: str) -> DistEnv:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: list[float], env: DistEnv) -> list[float]:
    """Average a few scalars over ranks (identity on one process)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return (t / env.world_size).tolist()


def sum_over_ranks(values: list[float], env: DistEnv) -> list[float]:
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def gather_to_all(obj, env: DistEnv) -> list:
    """Every rank's `obj` (picklable, CPU tensors), in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    # tensors travel as torch.save bytes: all_gather_object cannot unpickle tensors on every backend
    buf = io.BytesIO()
    torch.save(obj, buf)
    out = [None] * env.world_size
    dist.all_gather_object(out, buf.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in out]
