"""What a run trains: the model laid out over the ranks without any rank holding all of it on
its device, and the optimiser.

One process builds the plain model on its device, as the seed makes it. Under torchrun every
rank builds the model on the meta device (shapes, no memory), lays it out (moe_train.parallelize:
FSDP2 and expert parallelism shard meta parameters as they shard real ones) and allocates only
its shards (`to_empty`). A fresh run then takes its weights from rank 0, which alone builds the
real model on the host with the same seed (the initial weights of the 1-process run, whatever
the layout): `set_model_state_dict` with `full_state_dict` and `broadcast_from_rank0` sends
them one tensor at a time, each rank keeping its shard, so that a rank's device holds its
shards and one whole tensor at most. A resumed run needs no real model: its checkpoint's DCP
load (moe_train.run_state) fills the shards. Buffers outside the state dict (registered with
persistent=False) are in neither: rank 0 builds the real model for them in both cases and
broadcasts them.
"""

from __future__ import annotations

import moe_models
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from moe_train.parallelize import Layout, parallelize


def build_model(
    model_cfg, train, mesh: DeviceMesh | None, layout: Layout, device, *, weights: bool = True
) -> nn.Module:
    """The model of model_cfg laid out over `mesh`, with the seed's initial weights on every
    rank; weights=False: the shards are left uninitialised for a checkpoint to fill (buffers
    outside the state dict are set either way)."""
    if mesh is None:
        torch.manual_seed(train.seed)
        return parallelize(moe_models.build(model_cfg).to(device), mesh, layout, train)
    with torch.device("meta"):
        model = moe_models.build(model_cfg)
    parallelize(model, mesh, layout, train)
    model.to_empty(device=device)
    loose = non_persistent_buffers(model)
    real = None
    if dist.get_rank() == 0 and (weights or loose):
        torch.manual_seed(train.seed)
        real = moe_models.build(model_cfg)
    if weights:
        full = real.state_dict() if real is not None else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full, options=options)
    if loose:
        source = dict(real.named_buffers()) if real is not None else {}
        for name, buffer in loose.items():
            if real is not None:
                buffer.copy_(source[name])
            dist.broadcast(buffer, src=0)
    return model


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state dict leaves out, by qualified name."""
    found = {}
    for prefix, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            if module._buffers.get(name) is not None:
                found[f"{prefix}.{name}" if prefix else name] = module._buffers[name]
    return found


def build_optimizer(model: nn.Module, train) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases or other vectors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2))
