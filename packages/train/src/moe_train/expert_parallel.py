"""Expert parallelism for training: the routed layers' experts sharded over the ranks.

`shard_experts` wraps every `moe_layers.RoutedMoE` layer of a model in
`moe_layers.ExpertParallel`; the helpers below keep what leaves the ranks world-size independent:
the model and optimiser states are gathered back to the layout of an unwrapped model (the keys and
shapes a single-process run saves), and cut to this rank's shard again on loading. Without
ExpertParallel layers in the model every helper does what plain PyTorch does.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from moe_layers import ExpertParallel, RoutedMoE
from moe_layers.parallel import EXPERT_PARAMETERS
from torch import nn

from moe_train.errors import CLIError


def shard_experts(model: nn.Module, world_size: int) -> None:
    """Replace every RoutedMoE layer of `model` by ExpertParallel over the whole world."""
    routed = [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedMoE)]
    for name, layer in routed:
        if layer.experts.n_experts % world_size:
            raise CLIError(
                f"train.expert_parallel: {name} has {layer.experts.n_experts} experts, not divisible by "
                f"the world size {world_size}"
            )
        weights = sorted(n for n, _ in layer.experts.named_parameters())
        if weights != ["w1", "w2"]:
            raise CLIError(
                f"train.expert_parallel: {name}'s experts have weights {', '.join(weights)} "
                f"(activation {layer.experts.activation!r}); expert parallelism shards w1 and w2 only"
            )
    for name, layer in routed:
        parent, _, child = name.rpartition(".")
        # expert gradients averaged like DDP's dense ones, so one step equals the 1-process step
        wrapped = ExpertParallel(layer, average_expert_grads=True)
        setattr(model.get_submodule(parent), child, wrapped)


def _wrappers(model: nn.Module) -> dict[str, ExpertParallel]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallel)}


def _expert_shards(model: nn.Module) -> dict[int, ExpertParallel]:
    """id(parameter) -> its wrapper, for every expert shard of `model`."""
    return {
        id(m.layer.get_parameter(name)): m
        for m in _wrappers(model).values()
        for name in EXPERT_PARAMETERS
    }


def _gather(shard: torch.Tensor, wrapper: ExpertParallel) -> torch.Tensor:
    parts = [torch.empty_like(shard) for _ in range(wrapper.world_size)]
    dist.all_gather(parts, shard.contiguous(), group=wrapper.group)
    return torch.cat(parts)


def _local(full: torch.Tensor, wrapper: ExpertParallel) -> torch.Tensor:
    return full[wrapper.rank * wrapper.n_local : (wrapper.rank + 1) * wrapper.n_local].clone()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the unwrapped model (a collective when `model` has ExpertParallel layers)."""
    full = {prefix: wrapper.full_state_dict() for prefix, wrapper in _wrappers(model).items()}
    state = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in full if key.startswith(f"{p}.layer.")), None)
        if prefix is None:
            state[key] = value
        else:
            name = key.removeprefix(f"{prefix}.layer.")
            state[f"{prefix}.{name}"] = full[prefix][name]
    return state


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Parameters in the order that numbers them in `optimizer.state_dict()`."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """`optimizer.state_dict()` with the expert shards' per-element state (AdamW's exp_avg and
    exp_avg_sq) gathered to whole experts: the layout of an unwrapped model's optimiser. A
    collective when `model` has ExpertParallel layers."""
    shards = _expert_shards(model)
    state = optimizer.state_dict()
    # state_dict() shares the per-parameter dicts with the live optimiser: replace, never mutate
    state["state"] = dict(state["state"])
    for index, p in enumerate(_optimizer_params(optimizer)):
        if id(p) in shards and index in state["state"]:
            state["state"][index] = {
                key: _gather(value, shards[id(p)]) if value.dim() > 0 else value
                for key, value in state["state"][index].items()
            }
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict) -> None:
    """Loads a `full_optimizer_state` (or a single-process run's state), keeping this rank's
    experts of the per-element state of every expert shard."""
    shards = _expert_shards(model)
    sharded = dict(state["state"])
    for index, p in enumerate(_optimizer_params(optimizer)):
        if id(p) in shards and index in sharded:
            sharded[index] = {
                key: _local(value, shards[id(p)]) if value.dim() > 0 else value
                for key, value in sharded[index].items()
            }
    optimizer.load_state_dict({**state, "state": sharded})


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the whole model: with expert shards, their squared
    norms are summed over the ranks (each holds other experts) while the dense gradients, equal on
    every rank after DDP, count once; so every rank scales by the same, single-process factor.
    Returns the total norm before clipping (a device tensor); max_norm=inf only measures it."""
    shards = _expert_shards(model)
    if not shards:
        if math.isfinite(max_norm):
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters() if p.grad is not None]
        )
    dense = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in shards]
    experts = [p.grad for p in model.parameters() if p.grad is not None and id(p) in shards]
    device = next(model.parameters()).device
    expert_sq = sum((g.float().pow(2).sum() for g in experts), torch.zeros((), device=device))
    dist.all_reduce(expert_sq)
    dense_sq = sum((g.float().pow(2).sum() for g in dense), torch.zeros((), device=device))
    total = (dense_sq + expert_sq).sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in dense + experts:
            g.mul_(coef.to(g.dtype))
    return total
