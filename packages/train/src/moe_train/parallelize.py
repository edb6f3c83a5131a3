"""How a model is laid out over the ranks: the device mesh, expert parallelism, activation
checkpointing, compile and FSDP2, applied in that order (as torchtitan's `parallelize` does).

The layout (`Layout`, from train.dp_replicate, train.dp_shard, train.ep) is a 3-D DeviceMesh
(dp_replicate, efsdp, ep) with two flattened views: dp_shard = efsdp x ep, the ranks the dense
parameters are sharded over, and dp = every rank, the data-parallel group. The expert mesh is
borrowed from the dp_shard ranks ("dp2ep"): each routed layer's experts are DTensors placed
Shard(0) over `ep` (moe_layers.shard_experts, all-to-all token exchange), and FSDP2 shards each
expert shard further over `efsdp` (the dp_shard ranks that hold the same experts). Every block of
`model.layers` is one FSDP2 unit (its experts a unit of their own), the root module the last;
dp_replicate > 1 makes both meshes 2-D (HSDP: sharded within a group, replicated across groups).

Gradients: FSDP2 averages each gradient over the ranks it is sharded and replicated over. An
expert's gradient arrives already summed over the `ep` ranks whose tokens it saw, so
`scale_expert_grads` divides it by ep after the backward, and every gradient is then that of the
mean loss over the global batch, as on one process. (FSDP2's gradient divide factor would do it
inside the reduction, but needs PREMUL_SUM, which gloo lacks.) `clip_grad_norm_` clips with
torch's own functions, one total norm over the DTensors of both meshes.

One process: no mesh, no FSDP2, the plain model (there is nothing to shard over).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial

import torch
from moe_layers import RoutedMoE, shard_experts, sharded_experts
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from moe_train.errors import CLIError

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# selective activation checkpointing keeps these ops' outputs and recomputes the rest
SAVED_OPS = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default)


@dataclass(frozen=True)
class Layout:
    """dp_replicate groups of dp_shard ranks; the experts sharded over ep of each group's ranks."""

    dp_replicate: int
    dp_shard: int
    ep: int

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        return self.dp_shard // self.ep

    def describe(self) -> str:
        parts = [f"dp_replicate={self.dp_replicate}", f"dp_shard={self.dp_shard}"]
        return ", ".join([*parts, f"ep={self.ep}"])


def resolve_layout(train, world_size: int) -> Layout:
    """The layout the train.* keys ask for on `world_size` ranks; a one-line CLIError when the
    numbers do not multiply to the world size or ep does not divide dp_shard."""
    rep = train.dp_replicate
    if train.dp_shard == -1:
        if world_size % rep:
            raise CLIError(f"train.dp_replicate={rep} does not divide the world size {world_size}")
        shard = world_size // rep
    else:
        shard = train.dp_shard
    if rep * shard != world_size:
        raise CLIError(
            f"train.dp_replicate={rep} x train.dp_shard={shard} = {rep * shard} ranks, but "
            f"the world size is {world_size}"
        )
    ep = shard if train.expert_parallel and train.ep == 1 else train.ep
    if shard % ep:
        raise CLIError(
            f"train.ep={ep} must divide train.dp_shard={shard} (the experts are sharded over "
            "dp_shard's ranks)"
        )
    return Layout(rep, shard, ep)


LAYOUT_KEYS = ("dp_replicate", "dp_shard", "ep", "expert_parallel")


def layout_for_resume(saved, given: set[str], world_size: int):
    """The train config a resumed run uses on `world_size` ranks, and a note (None when nothing
    changed). The layout keys the user gave (`given`) are theirs; the others are the saved run's
    where they still fit this world size, else the defaults: first ep (and expert_parallel),
    then dp_replicate and dp_shard, then all of them. When nothing fits, the user's keys do
    not: the defaults around them are returned, and resolve_layout then names the user's key."""
    defaults = type(saved)()
    candidates = [(), ("ep", "expert_parallel"), ("dp_replicate", "dp_shard"), LAYOUT_KEYS]
    for reset in candidates:
        keys = [k for k in reset if k not in given and getattr(saved, k) != getattr(defaults, k)]
        if reset and not keys:
            continue
        train = dataclasses.replace(saved, **{k: getattr(defaults, k) for k in keys})
        try:
            layout = resolve_layout(train, world_size)
        except CLIError:
            continue
        if not keys:
            return train, None
        was = ", ".join(f"train.{k}={getattr(saved, k)}" for k in keys)
        now = ", ".join(f"train.{k}={getattr(train, k)}" for k in keys)
        return train, (
            f"note: the checkpoint's {was} does not fit {world_size} process(es); resuming with "
            f"{now} ({layout.describe()}; set the train.* layout keys to choose another)"
        )
    return train, None


def build_mesh(layout: Layout, device: torch.device) -> DeviceMesh | None:
    """The 3-D mesh with its dp_shard and dp views (None on one process)."""
    if layout.world_size == 1:
        return None
    mesh = init_device_mesh(
        device.type,
        (layout.dp_replicate, layout.efsdp, layout.ep),
        mesh_dim_names=("dp_replicate", "efsdp", "ep"),
    )
    mesh["efsdp", "ep"]._flatten("dp_shard")
    mesh["dp_replicate", "efsdp", "ep"]._flatten("dp")
    return mesh


def dense_mesh(mesh: DeviceMesh, layout: Layout) -> DeviceMesh:
    return mesh["dp_replicate", "dp_shard"] if layout.dp_replicate > 1 else mesh["dp_shard"]


def expert_mesh(mesh: DeviceMesh, layout: Layout) -> DeviceMesh:
    return mesh["dp_replicate", "efsdp"] if layout.dp_replicate > 1 else mesh["efsdp"]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a moe_models language model (`model.layers`)."""
    return list(getattr(model, "layers", []))


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    for name, layer in model.named_modules():
        if isinstance(layer, RoutedMoE):
            try:
                shard_experts(layer, ep_mesh)
            except ValueError as e:
                raise CLIError(f"train.ep={ep_mesh.size()}: {name}: {e}") from None


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute each block's activations in the backward (`full`), or all but the matmul
    outputs (`selective`). The block's forward is replaced in place, so parameter and module
    names stay those of the plain model."""
    if mode == "none":
        return
    context_fn = (
        partial(create_selective_checkpoint_contexts, _selective_policy)
        if mode == "selective"
        else None
    )
    for block in blocks(model):
        forward = block.forward
        kwargs = {"context_fn": context_fn} if context_fn is not None else {}

        def run(*args, _forward=forward, _kwargs=kwargs, **kw):
            return checkpoint(_forward, *args, use_reentrant=False, **_kwargs, **kw)

        block.forward = run


def apply_compile(model: nn.Module) -> None:
    """torch.compile per block (in place: names unchanged); a model without blocks whole."""
    parts = blocks(model) or [model]
    for part in parts:
        part.compile()


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, layout: Layout, train) -> None:
    # fp32: no cast (the parameters' own dtype, fp32 in a run; fp64 in the exactness tests)
    policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[train.param_dtype], reduce_dtype=DTYPES[train.reduce_dtype]
    )
    dense = dense_mesh(mesh, layout)
    options = dict(mp_policy=policy, reshard_after_forward=train.reshard_after_forward)
    for block in blocks(model):
        for experts in sharded_experts(block):
            fully_shard(experts, mesh=expert_mesh(mesh, layout), **options)
        fully_shard(block, mesh=dense, **options)
    fully_shard(model, mesh=dense, **options)


def parallelize(model: nn.Module, mesh: DeviceMesh | None, layout: Layout, train) -> nn.Module:
    """Lay `model` (built identically on every rank) out over `mesh`, in place."""
    if layout.ep > 1:
        apply_expert_parallel(model, mesh["ep"])
    apply_activation_checkpointing(model, train.activation_checkpointing)
    if train.compile:
        apply_compile(model)
    if mesh is not None:
        apply_fsdp(model, mesh, layout, train)
    return model


def grad_scaler(precision: str, device: torch.device, distributed: bool):
    """fp16's loss scaler (disabled at other precisions). Under torchrun each rank holds only its
    gradient shards: ShardedGradScaler all-reduces the overflow flag over every rank, so all of
    them skip the same steps and keep the same scale."""
    enabled = precision == "fp16"
    if distributed:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=device.type, enabled=enabled)
    return torch.amp.GradScaler(device.type, enabled=enabled)


def scale_expert_grads(model: nn.Module, ep: int) -> None:
    """Divide the expert gradients by ep (see the module docstring)."""
    if ep == 1:
        return
    for experts in sharded_experts(model):
        for p in experts.parameters():
            if p.grad is not None:
                p.grad.div_(ep)


def _norm(grads: list[torch.Tensor]) -> torch.Tensor:
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The total gradient norm over every parameter (a device tensor); the gradients are scaled
    to max_norm when it is finite and exceeded. DTensor gradients on different meshes (dense and
    expert) are measured per mesh by torch.nn.utils.get_total_norm and combined."""
    params = [p for p in model.parameters() if p.grad is not None]
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for p in params:
        key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
        by_mesh.setdefault(key, []).append(p.grad)
    if len(by_mesh) == 1:
        total = _norm(next(iter(by_mesh.values())))
    else:
        total = torch.stack([_norm(g) for g in by_mesh.values()]).norm()
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            grad.mul_(coef.to(grad.dtype))
    return total
