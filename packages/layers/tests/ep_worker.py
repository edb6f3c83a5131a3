"""The per-rank body of test_parallel.py's 2-process gloo test (a module of its own so that the
spawned processes can import it by name; pytest does not collect it)."""

from __future__ import annotations

import copy
from datetime import timedelta

import torch
import torch.distributed as dist
from moe_layers import (
    BaseLayer,
    GShardMoE,
    HashLayer,
    SigmaMoE,
    TMoE,
    TokenChoiceMoE,
    collect_aux_losses,
    shard_experts,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

D_MODEL = 5
VOCAB = 11


def cases():
    """(name, layer factory, train mode, tokens on each rank, same token id everywhere)."""
    return [
        ("gshard", lambda: GShardMoE(D_MODEL, 4, 3, second_policy="all", capacity_factor=0.5), True, (6, 3), False),
        ("base", lambda: BaseLayer(D_MODEL, 4, 3), True, (8, 4), False),
        ("hash", lambda: HashLayer(D_MODEL, 2, 3, vocab_size=VOCAB, hash="balanced"), False, (5, 0), False),
        ("sigma", lambda: SigmaMoE(D_MODEL, 4, 3, 2, entropy_weight=0.1), True, (1, 7), False),
        ("tmoe", lambda: TMoE(D_MODEL, 6, 2, impl="reference"), False, (4, 5), False),
        ("swiglu", lambda: TokenChoiceMoE(D_MODEL, 4, 3, 2, activation="swiglu"), True, (5, 3), False),
        ("base-bias", lambda: BaseLayer(D_MODEL, 4, 3, expert_bias=True), True, (6, 2), False),
        # skewed: every token of every rank to one expert, and a rank without tokens
        ("skewed", lambda: HashLayer(D_MODEL, 4, 3, vocab_size=VOCAB, hash="balanced"), True, (7, 0), True),
    ]  # fmt: skip


def rank_inputs(rank: int, n_tokens: int, same_id: bool = False):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n_tokens, D_MODEL, generator=gen, dtype=torch.float64)
    ids = torch.randint(VOCAB, (n_tokens,), generator=gen)
    if same_id:
        ids = torch.full_like(ids, 3)
    cotangent = torch.randn(n_tokens, D_MODEL, generator=gen, dtype=torch.float64)
    return x, ids, cotangent


def loss_of(layer, x, ids, cotangent):
    routed_by_ids = isinstance(layer, HashLayer)
    y = layer(x, token_ids=ids) if routed_by_ids else layer(x)
    return y, (y * cotangent).sum() + sum(collect_aux_losses(layer).values())


def grad_or_zeros(p):
    return torch.zeros_like(p) if p.grad is None else p.grad


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def check_matches_single_process(name, make, training, sizes, same_id, rank, world, mesh):
    torch.manual_seed(0)
    full = make().double().train(training)
    ep = copy.deepcopy(full)
    shard_experts(ep, mesh)
    # the single-process reference: the unsharded layer on every rank's tokens, one call per rank
    ref_x, ref_y = [], []
    total = 0
    for r in range(world):
        x, ids, cot = rank_inputs(r, sizes[r], same_id)
        x.requires_grad_(True)
        y, loss = loss_of(full, x, ids, cot)
        total = total + loss
        ref_x.append(x)
        ref_y.append(y.detach())
    total.backward()

    x, ids, cot = rank_inputs(rank, sizes[rank], same_id)
    x.requires_grad_(True)
    y, loss = loss_of(ep, x, ids, cot)
    loss.backward()
    msg = f"{name} on rank {rank}"
    torch.testing.assert_close(y, ref_y[rank], msg=lambda m: f"{msg}: output: {m}")
    torch.testing.assert_close(x.grad, ref_x[rank].grad, msg=lambda m: f"{msg}: input grad: {m}")
    n_local = ep.experts.n_local
    lo, hi = rank * n_local, (rank + 1) * n_local
    for pname, p in ep.named_parameters():
        ref_p = dict(full.named_parameters())[pname]
        if pname.startswith("experts."):
            # the expert shard's gradient: the sum over every rank's tokens routed to it
            assert isinstance(p, DTensor) and p.shape == ref_p.shape, (msg, pname)
            expected = grad_or_zeros(ref_p)[lo:hi]
            got = local(grad_or_zeros(p))
        else:
            # dense parameters: the ranks' gradients sum to the reference's
            got = grad_or_zeros(p).clone()
            dist.all_reduce(got)
            expected = grad_or_zeros(ref_p)
        torch.testing.assert_close(got, expected, msg=lambda m, n=pname: f"{msg}: grad {n}: {m}")


def check_state_dict_is_global(rank, world, mesh):
    """The sharded layer's state dict has the unsharded keys and global shapes (DTensors)."""
    torch.manual_seed(0)
    full = GShardMoE(D_MODEL, 4, 3, second_policy="all").double().eval()
    ep = copy.deepcopy(full)
    shard_experts(ep, mesh)
    x, _, _ = rank_inputs(rank, 6)
    torch.testing.assert_close(ep(x), full(x))
    state = ep.state_dict()
    assert state.keys() == full.state_dict().keys()
    for key, value in full.state_dict().items():
        got = state[key].full_tensor() if isinstance(state[key], DTensor) else state[key]
        torch.testing.assert_close(got, value)


def check_bf16_autocast(rank, world, mesh):
    """Under bf16 autocast (moe-train --precision bf16) the sharded layer runs and stays close to
    the unsharded one under the same autocast."""
    torch.manual_seed(0)
    full = SigmaMoE(D_MODEL, 4, 3, 2).eval()
    ep = copy.deepcopy(full)
    shard_experts(ep, mesh)
    x = rank_inputs(rank, 6)[0].float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ep, y_full = ep(x), full(x)
    torch.testing.assert_close(y_ep.float(), y_full.float(), rtol=2e-2, atol=2e-2)


def check_indivisible_expert_count(mesh):
    try:
        shard_experts(GShardMoE(D_MODEL, 3, 2), mesh)
    except ValueError as err:
        assert "do not divide" in str(err)
    else:
        raise AssertionError("3 experts on 2 ranks did not raise")


def run_checks(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        mesh = init_device_mesh("cpu", (world,))
        for name, make, training, sizes, same_id in cases():
            check_matches_single_process(name, make, training, sizes, same_id, rank, world, mesh)
        check_state_dict_is_global(rank, world, mesh)
        check_bf16_autocast(rank, world, mesh)
        check_indivisible_expert_count(mesh)
    finally:
        dist.destroy_process_group()
