"""Expert parallelism: the experts of a routed layer sharded over the ranks of a process group.

Each rank keeps experts [rank * E/W, (rank + 1) * E/W) of the layer's `experts` (w1 and w2) and
routes its own tokens as before; the (token, slot) rows are sent with a variable-size all_to_all to the rank owning their
expert, run through the local expert MLP there and sent back the same way, where the gates are
applied. The exchange is an autograd Function whose backward is the reverse all_to_all, so
gradients reach the inputs, the gate and the remote experts exactly.

Uses `torch.distributed.all_to_all_single` with uneven split sizes, which the gloo backend supports
on CPU tensors (and NCCL on CUDA ones).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_layers.base import Experts, RoutedMoE

# names in the layer's state dict of the parameters that are sharded
EXPERT_PARAMETERS = ("experts.w1", "experts.w2")


class AllToAll(torch.autograd.Function):
    """Rows of x sent in blocks of `send_splits` to the ranks in order, received in `recv_splits`."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, recv_splits: list[int], send_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        out_MD = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(out_MD, x_ND.contiguous(), recv_splits, send_splits, group=group)
        return out_MD

    @staticmethod
    def backward(ctx, grad_MD: Tensor):
        recv_splits, send_splits = ctx.splits
        grad_ND = grad_MD.new_empty((sum(send_splits), *grad_MD.shape[1:]))
        dist.all_to_all_single(
            grad_ND, grad_MD.contiguous(), send_splits, recv_splits, group=ctx.group
        )
        return grad_ND, None, None, None


class ShardedExperts(Experts):
    """This rank's share of an Experts module: local experts [rank * L, (rank + 1) * L), L = E/W.

    Called as the Experts it replaces, with the global expert indices: the (token, slot) rows are
    sent to the ranks owning their experts, run through the local experts there and sent back.
    w1 [L, D, G], w2 [L, G, D]; n_experts stays E (the indices the router gives), n_local is L.
    """

    def __init__(self, experts: Experts, group, rank: int, world_size: int) -> None:
        n_local = experts.n_experts // world_size
        super().__init__(
            experts.d_model,
            n_local,
            experts.expert_size,
            activation=experts.activation,
            hidden_dropout=experts.hidden_dropout,
            impl=experts.impl,
        )
        self.group, self.world_size, self.n_local = group, world_size, n_local
        self.n_experts = experts.n_experts
        local = slice(rank * n_local, (rank + 1) * n_local)
        self.w1 = nn.Parameter(experts.w1.detach()[local].clone())
        self.w2 = nn.Parameter(experts.w2.detach()[local].clone())

    def forward(self, x_TD: Tensor, idx_TK: Tensor, gates_TK: Tensor) -> Tensor:
        n_tokens, k = idx_TK.shape
        flat_N = idx_TK.reshape(-1)
        order_N = torch.argsort(flat_N, stable=True)
        tok_N = order_N // k
        counts_E = torch.bincount(flat_N, minlength=self.n_experts)
        # recv_counts_WL[r, l]: rows rank r sends to this rank's local expert l
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        recv_counts_WL = recv_counts.view(self.world_size, self.n_local)
        send_splits = counts_E.view(self.world_size, self.n_local).sum(1).tolist()
        recv_splits = recv_counts_WL.sum(1).tolist()
        recv_MD = AllToAll.apply(x_TD[tok_N], recv_splits, send_splits, self.group)
        # received rows arrive grouped by source rank, and by local expert within each source
        local_M1 = torch.repeat_interleave(
            torch.arange(self.n_local, device=x_TD.device).repeat(self.world_size),
            recv_counts_WL.flatten().to(x_TD.device),
        )[:, None]
        ones_M1 = recv_MD.new_ones(local_M1.shape)
        out_MD = super().forward(recv_MD, local_M1, ones_M1)
        back_ND = AllToAll.apply(out_MD, send_splits, recv_splits, self.group)
        gated_ND = back_ND * gates_TK.reshape(-1)[order_N, None].to(back_ND.dtype)
        # the experts' dtype, which autocast may have lowered below x's
        return gated_ND.new_zeros(n_tokens, x_TD.shape[-1]).index_add(0, tok_N, gated_ND)


class ExpertParallel(nn.Module):
    """Wraps a RoutedMoE layer (GShardMoE, BaseLayer, HashLayer, TMoE, SigmaMoE, ...) so that
    each rank of `process_group` (default: the world) holds and runs only its share of the experts.

    Call it as the layer: `ep(x, **kwargs)` runs `layer(x, **kwargs)` on this rank's tokens (routing,
    capacity and auxiliary losses stay local to the rank, as in fairseq). Every rank must call
    forward and backward of the layer the same number of times (the exchanges are collectives).

    Parameters: `layer.experts` becomes a ShardedExperts, whose w1 and w2 are this rank's shard
    [E/W, ...]; the dense ones (router.gate) stay whole and replicated: give them to
    DistributedDataParallel and keep the expert shards out of its gradient averaging
    (`expert_parameter_names(model)` lists them, e.g. for
    `DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`). An expert's gradient
    is the sum over ranks of each rank's loss gradient; `average_expert_grads=True` divides it by
    W so that it matches DDP's averaging of the dense gradients.

    The shard is cut from the layer's weights at wrapping, so build the layer from the same seed on
    every rank or call `load_full_state_dict` afterwards. `full_state_dict()` gathers the whole
    layer back (keys of the unwrapped layer: EXPERT_PARAMETERS are "experts.w1", "experts.w2"), so
    checkpoints move between world sizes.
    """

    def __init__(
        self,
        layer: RoutedMoE,
        process_group: dist.ProcessGroup | None = None,
        *,
        average_expert_grads: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(layer, RoutedMoE):
            raise ValueError(f"ExpertParallel wraps a RoutedMoE layer, got {type(layer).__name__}")
        if type(layer.experts) is not Experts:
            raise ValueError(
                f"ExpertParallel shards an Experts module, got {type(layer.experts).__name__}"
            )
        weights = sorted(name for name, _ in layer.experts.named_parameters())
        if weights != ["w1", "w2"]:
            raise ValueError(
                f"ExpertParallel shards experts of weights w1 and w2, got {', '.join(weights)} "
                f"(activation {layer.experts.activation!r})"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "ExpertParallel needs an initialised torch.distributed process group "
                "(call torch.distributed.init_process_group first)"
            )
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.n_experts = layer.experts.n_experts
        if self.n_experts % self.world_size:
            raise ValueError(
                f"n_experts={self.n_experts} must be divisible by the process group's world size "
                f"{self.world_size}"
            )
        self.n_local = self.n_experts // self.world_size
        layer.experts = ShardedExperts(layer.experts, process_group, self.rank, self.world_size)
        if average_expert_grads:
            for name in EXPERT_PARAMETERS:
                layer.get_parameter(name).register_hook(lambda g: g / self.world_size)
        self.layer = layer

    def forward(self, *args, **kwargs):
        return self.layer(*args, **kwargs)

    def load_full_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True):
        """Loads an unsharded state dict of the layer (as `layer.state_dict()` of the unwrapped
        layer), keeping this rank's experts."""
        sharded = dict(state_dict)
        local = slice(self.rank * self.n_local, (self.rank + 1) * self.n_local)
        for name in EXPERT_PARAMETERS:
            if name not in sharded:
                if strict:
                    raise ValueError(f"state_dict has no {name!r} (the layer's experts)")
                continue
            if sharded[name].shape[0] != self.n_experts:
                raise ValueError(
                    f"state_dict[{name!r}] holds {sharded[name].shape[0]} experts; this layer has "
                    f"{self.n_experts}"
                )
            sharded[name] = sharded[name][local]
        return self.layer.load_state_dict(sharded, strict=strict)

    def full_state_dict(self) -> dict[str, Tensor]:
        """The unsharded state dict of the layer, gathered from all ranks (a collective)."""
        state = self.layer.state_dict()
        for name in EXPERT_PARAMETERS:
            shard = state[name].contiguous()
            parts = [torch.empty_like(shard) for _ in range(self.world_size)]
            dist.all_gather(parts, shard, group=self.group)
            state[name] = torch.cat(parts)
        return state


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of the sharded expert parameters of every ExpertParallel in `model`."""
    return [
        f"{prefix}.layer.{name}" if prefix else f"layer.{name}"
        for prefix, m in model.named_modules()
        if isinstance(m, ExpertParallel)
        for name in EXPERT_PARAMETERS
    ]
