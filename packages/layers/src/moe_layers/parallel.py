"""Expert parallelism: the experts of a routed layer sharded over an expert mesh, the tokens
exchanged by a dispatcher beside them.

`shard_experts(layer, ep_mesh)` replaces `layer.experts` (an `Experts`) in place by
`ShardedExperts`: its weights (w1 [E, D, G], w2 [E, G, D], and w3, b1, b2 where the experts have
them) become DTensor parameters placed `Shard(0)` over the 1-D `ep_mesh` (rank r of W holds
experts [r * E/W, (r + 1) * E/W)), with the names and
global shapes of the unsharded layer, so that `torch.distributed.checkpoint` saves and reshards
them like any parameter. The routed layer itself is untouched: it routes its own tokens and calls
`self.experts(x_TD, idx_TK, gates_TK)` as before, so every RoutedMoE (σ-MoE, Switch with capacity
drops, S-BASE, GShard, BASE, HASH, tMoE, and the layers users register) runs under expert
parallelism without knowing it.

The exchange is `AllToAllDispatcher`: `dispatch` sends each (token, slot) row to the rank that
holds its expert (sorted by expert, one variable-size `all_to_all_single` over the expert mesh),
the local experts run on what arrived, and `combine` sends the results back and applies the gates
where the tokens live. Both are differentiable (the backward of an all-to-all is the reverse
all-to-all), so gradients reach the inputs, the gates and the experts exactly: an expert's gradient
is the sum over the ranks' tokens routed to it. The split sizes must cross to the host, so under
`torch.compile` `dispatch` and `combine` are the layer's only graph breaks (the routing before,
the expert MLP between and the gating after compile; the split sizes are not guarded on, so
new routings recompile nothing). Dynamo counts a break once per Python frame between the
compiled function and the break: `torch._dynamo.explain` of a σ-MoE, Switch or GShard layer
reports 4 breaks in 5 graphs, of an S-BASE layer 3 in 4 (tests/test_parallel.py).

gloo (CPU) and NCCL (CUDA) both support `all_to_all_single` with uneven splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_layers.base import Experts, RoutedMoE

if TYPE_CHECKING:
    # torch.distributed.tensor imports sympy and torch's symbolic shapes (seconds): it is imported
    # where experts are sharded, not by every program that imports moe_layers
    from torch.distributed.device_mesh import DeviceMesh


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


@dataclass
class Exchange:
    """What `combine` needs to undo a `dispatch`: the sort order of the (token, slot) rows, their
    tokens, the split sizes of both directions and the number of tokens."""

    order_N: Tensor
    tok_N: Tensor
    send_splits: list[int]
    recv_splits: list[int]
    n_tokens: int


class AllToAllDispatcher:
    """The token exchange over a process group of W ranks, each holding E/W experts.

    Its methods are kept out of torch.compile by torch._disable_dynamo, which imports
    torch._dynamo at their first call: torch.compiler.disable as a decorator imports it when this
    module is imported, seconds that every program using moe_layers would pay."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.n_experts = n_experts
        self.n_local = n_experts // self.world_size

    @torch._disable_dynamo
    def dispatch(self, x_TD: Tensor, idx_TK: Tensor) -> tuple[Tensor, Tensor, Exchange]:
        """(rows received for this rank's experts, their local expert index [M, 1], exchange)."""
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
        return recv_MD, local_M1, Exchange(order_N, tok_N, send_splits, recv_splits, n_tokens)

    @torch._disable_dynamo
    def combine(self, out_MD: Tensor, gates_TK: Tensor, ex: Exchange) -> Tensor:
        """The expert outputs back on their tokens' ranks, gated and summed per token."""
        back_ND = AllToAll.apply(out_MD, ex.send_splits, ex.recv_splits, self.group)
        gated_ND = back_ND * gates_TK.reshape(-1)[ex.order_N, None].to(back_ND.dtype)
        # the experts' dtype, which autocast may have lowered below the input's
        y_TD = gated_ND.new_zeros(ex.n_tokens, out_MD.shape[-1])
        return y_TD.index_add(0, ex.tok_N, gated_ND)


class ShardedExperts(Experts):
    """An Experts module whose weights are DTensors placed Shard(0) over an expert mesh.

    Called as the Experts it replaces, with the global expert indices. n_experts stays E (what
    the router gives); n_local is this rank's E/W.
    """

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh) -> None:
        nn.Module.__init__(self)
        self.d_model, self.n_experts = experts.d_model, experts.n_experts
        self.expert_size, self.activation = experts.expert_size, experts.activation
        self.hidden_dropout, self.impl = experts.hidden_dropout, experts.impl
        self.bias = experts.bias
        self.dispatcher = AllToAllDispatcher(ep_mesh.get_group(), experts.n_experts)
        self.n_local = self.dispatcher.n_local
        from torch.distributed.tensor import Shard, distribute_tensor

        # every expert weight is [E, ...]; scattered from the mesh's first rank, so that every
        # rank starts from the same experts
        for name, weight in experts.named_parameters(recurse=False):
            shard = distribute_tensor(weight.detach(), ep_mesh, [Shard(0)])
            self.register_parameter(name, nn.Parameter(shard))

    def forward(self, x_TD: Tensor, idx_TK: Tensor, gates_TK: Tensor) -> Tensor:
        recv_MD, local_M1, ex = self.dispatcher.dispatch(x_TD, idx_TK)
        # every weight is a DTensor (placed here; FSDP2 unshards it to the same placement)
        weights = {name: getattr(self, name).to_local() for name in self._parameters}
        # the gates are applied where the tokens live (combine), to the whole expert output
        out_MD = self.mlp(recv_MD, local_M1, recv_MD.new_ones(local_M1.shape), weights)
        return self.dispatcher.combine(out_MD, gates_TK, ex)


def shard_experts(layer: RoutedMoE, ep_mesh: DeviceMesh) -> ShardedExperts:
    """Shard `layer.experts` over the 1-D `ep_mesh` in place (see the module docstring); returns
    the new experts module. A ValueError when the experts do not divide over the mesh."""
    if not isinstance(layer, RoutedMoE):
        raise ValueError(f"shard_experts takes a RoutedMoE layer, got {type(layer).__name__}")
    if type(layer.experts) is not Experts:
        raise ValueError(
            f"shard_experts shards an Experts module, got {type(layer.experts).__name__}"
        )
    if ep_mesh.ndim != 1:
        raise ValueError(f"the expert mesh must be 1-D, got {ep_mesh.ndim} dimensions")
    n_experts, size = layer.experts.n_experts, ep_mesh.size()
    if n_experts % size:
        raise ValueError(f"{n_experts} experts do not divide over an expert mesh of {size} ranks")
    layer.experts = ShardedExperts(layer.experts, ep_mesh)
    return layer.experts


def sharded_experts(model: nn.Module) -> list[ShardedExperts]:
    """Every ShardedExperts module of `model`."""
    return [m for m in model.modules() if isinstance(m, ShardedExperts)]
