"""The per-rank body of test_token_choice.py's 2-process gloo test (a module of its own so that
the spawned processes can import it by name; pytest does not collect it)."""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from moe_layers import TokenChoiceMoE, after_optimizer_step
from torch import nn

RATE = 0.25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        TokenChoiceMoE(4, 6, 3, k=2, score="sigmoid", bias_update_rate=RATE),
        TokenChoiceMoE(4, 6, 3, k=1, bias_update_rate=RATE),
    )


def micro_batches(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + rank)
    return [torch.randn(5 + 3 * rank, 4, generator=gen) + rank for _ in range(2)]


def run_checks(rank: int, world_size: int, port: int) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        model = make_model().train()
        for x in micro_batches(rank):
            # what DDP does before a forward outside no_sync (its construction alone takes half
            # a minute here): rank 0's buffers overwrite the others'
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
            model(x).sum().backward()
        after_optimizer_step(model)
        loads = [layer.router.last_load for layer in model]
        biases = [layer.router.expert_bias.clone() for layer in model]
        for mine in (*loads, *biases):
            gathered = [torch.empty_like(mine) for _ in range(world_size)]
            dist.all_gather(gathered, mine)
            assert all(torch.equal(g, mine) for g in gathered), (rank, gathered)
        # one process given every micro-batch of every rank counts the same load, and moves the
        # bias the same way
        alone = make_model().train()
        x = torch.cat([b for r in range(world_size) for b in micro_batches(r)])
        alone(x)
        for layer, theirs, load, bias in zip(alone, model, loads, biases, strict=True):
            torch.testing.assert_close(layer.router.pending_load, load, rtol=0, atol=0)
            layer.router.pending_load = None
            layer.router.last_load = None
            load_f = load.float()
            step = RATE * torch.sign(load_f.mean() - load_f)
            torch.testing.assert_close(bias, step - step.mean())
            assert load.sum() == x.shape[0] * theirs.config.k
        check_global_balance_loss(rank, world_size)
    finally:
        dist.destroy_process_group()


def check_global_balance_loss(rank: int, world_size: int) -> None:
    """balance_scope="global": f from every rank's assignments, P from this rank's tokens."""
    torch.manual_seed(1)
    layer = TokenChoiceMoE(4, 6, 3, k=2, balance_loss_weight=1.0, balance_scope="global").train()
    x = micro_batches(rank)[0]
    layer(x)
    mine = layer.routing_stats.expert_counts
    counts = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(counts, mine)
    f = torch.stack(counts).sum(0).float()
    f = f / f.sum()
    probs = torch.softmax(x @ layer.router.gate.t(), dim=-1)
    expected = 6 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(layer.aux_losses["balance"], expected)
    local = TokenChoiceMoE(4, 6, 3, k=2, balance_loss_weight=1.0).train()
    local.load_state_dict(layer.state_dict())
    local(x)
    assert not torch.allclose(local.aux_losses["balance"], expected)
