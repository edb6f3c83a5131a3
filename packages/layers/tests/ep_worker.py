"""The per-rank body of test_parallel.py's 2-process gloo test (a module of its own so that the
spawned processes can import it by name; pytest does not collect it)."""

from __future__ import annotations

import copy
from datetime import timedelta

import torch
import torch.distributed as dist
from moe_layers import (
    BaseLayer,
    ExpertParallel,
    GShardMoE,
    HashLayer,
    SigmaMoE,
    TMoE,
    collect_aux_losses,
    expert_parameter_names,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

D_MODEL = 5
VOCAB = 11


def cases():
    """(name, layer factory, train mode, tokens on each rank)."""
    return [
        ("gshard", lambda: GShardMoE(D_MODEL, 4, 3, second_policy="all", capacity_factor=0.5), True, (6, 3)),
        ("base", lambda: BaseLayer(D_MODEL, 4, 3), True, (8, 4)),
        ("hash", lambda: HashLayer(D_MODEL, 2, 3, vocab_size=VOCAB, hash="balanced"), False, (5, 0)),
        ("sigma", lambda: SigmaMoE(D_MODEL, 4, 3, 2, entropy_weight=0.1), True, (1, 7)),
        ("tmoe", lambda: TMoE(D_MODEL, 6, 2, impl="reference"), False, (4, 5)),
    ]  # fmt: skip


def rank_inputs(rank: int, n_tokens: int):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n_tokens, D_MODEL, generator=gen, dtype=torch.float64)
    ids = torch.randint(VOCAB, (n_tokens,), generator=gen)
    cotangent = torch.randn(n_tokens, D_MODEL, generator=gen, dtype=torch.float64)
    return x, ids, cotangent


def loss_of(layer, x, ids, cotangent):
    routed_by_ids = isinstance(getattr(layer, "layer", layer), HashLayer)
    y = layer(x, token_ids=ids) if routed_by_ids else layer(x)
    return y, (y * cotangent).sum() + sum(collect_aux_losses(layer).values())


def grad_or_zeros(p):
    return torch.zeros_like(p) if p.grad is None else p.grad


def check_matches_single_process(name, make, training, sizes, rank, world, average):
    torch.manual_seed(0)
    full = make().double().train(training)
    ep = ExpertParallel(copy.deepcopy(full), average_expert_grads=average)
    # the single-process reference: the unsharded layer on every rank's tokens, one call per rank
    ref_x, ref_y = [], []
    total = 0
    for r in range(world):
        x, ids, cot = rank_inputs(r, sizes[r])
        x.requires_grad_(True)
        y, loss = loss_of(full, x, ids, cot)
        total = total + loss
        ref_x.append(x)
        ref_y.append(y.detach())
    total.backward()

    x, ids, cot = rank_inputs(rank, sizes[rank])
    x.requires_grad_(True)
    y, loss = loss_of(ep, x, ids, cot)
    loss.backward()
    msg = f"{name} on rank {rank}"
    torch.testing.assert_close(y, ref_y[rank], msg=lambda m: f"{msg}: output: {m}")
    torch.testing.assert_close(x.grad, ref_x[rank].grad, msg=lambda m: f"{msg}: input grad: {m}")
    lo, hi = rank * ep.n_local, (rank + 1) * ep.n_local
    for pname, p in ep.layer.named_parameters():
        ref_p = dict(full.named_parameters())[pname]
        if pname in ("experts.w1", "experts.w2"):
            expected = grad_or_zeros(ref_p)[lo:hi] / (world if average else 1)
            got = grad_or_zeros(p)
        else:
            # dense parameters: what DDP would sum (it averages; the reference sums the losses)
            got = grad_or_zeros(p).clone()
            dist.all_reduce(got)
            expected = grad_or_zeros(ref_p)
        torch.testing.assert_close(got, expected, msg=lambda m, n=pname: f"{msg}: grad {n}: {m}")


def check_ddp_composition(rank, world):
    """DDP averages the gate's gradient and leaves the expert shards alone; with
    average_expert_grads the experts' gradients are averaged alike: all equal the single-process
    gradient of the mean of the ranks' losses."""
    torch.manual_seed(0)
    full = GShardMoE(D_MODEL, 4, 3, second_policy="all").double().train()
    model = nn.Sequential(ExpertParallel(copy.deepcopy(full), average_expert_grads=True))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, expert_parameter_names(model)
    )
    ddp = DistributedDataParallel(model)
    total = 0
    for r in range(world):
        x, ids, cot = rank_inputs(r, 4 + r)
        total = total + loss_of(full, x, ids, cot)[1] / world
    total.backward()
    x, ids, cot = rank_inputs(rank, 4 + rank)
    y = ddp(x)
    ((y * cot).sum() + sum(collect_aux_losses(model).values())).backward()
    ep = model[0]
    lo, hi = rank * ep.n_local, (rank + 1) * ep.n_local
    torch.testing.assert_close(ep.layer.router.gate.grad, full.router.gate.grad)
    torch.testing.assert_close(ep.layer.experts.w1.grad, full.experts.w1.grad[lo:hi])
    torch.testing.assert_close(ep.layer.experts.w2.grad, full.experts.w2.grad[lo:hi])


def check_state_dict_round_trip(rank, world):
    torch.manual_seed(0)
    full = GShardMoE(D_MODEL, 4, 3, second_policy="all").double().eval()
    torch.manual_seed(1 + rank)
    ep = ExpertParallel(GShardMoE(D_MODEL, 4, 3, second_policy="all").double().eval())
    ep.load_full_state_dict(full.state_dict())
    x, _, _ = rank_inputs(rank, 6)
    torch.testing.assert_close(ep(x), full(x))
    gathered = ep.full_state_dict()
    assert gathered.keys() == full.state_dict().keys()
    for key, value in full.state_dict().items():
        torch.testing.assert_close(gathered[key], value)
    try:
        ep.load_full_state_dict({**full.state_dict(), "experts.w1": full.experts.w1[:2]})
    except ValueError as err:
        assert "experts" in str(err)
    else:
        raise AssertionError("loading a state dict with the wrong expert count did not fail")


def check_bf16_autocast(rank, world):
    """Under bf16 autocast (moe-train --precision bf16) the sharded layer runs and stays close to
    the unsharded one under the same autocast."""
    torch.manual_seed(0)
    full = SigmaMoE(D_MODEL, 4, 3, 2).eval()
    ep = ExpertParallel(copy.deepcopy(full))
    x = rank_inputs(rank, 6)[0].float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ep, y_full = ep(x), full(x)
    torch.testing.assert_close(y_ep.float(), y_full.float(), rtol=2e-2, atol=2e-2)


def check_indivisible_expert_count():
    try:
        ExpertParallel(GShardMoE(D_MODEL, 3, 2))
    except ValueError as err:
        assert "divisible" in str(err)
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
        for name, make, training, sizes in cases():
            check_matches_single_process(name, make, training, sizes, rank, world, average=False)
        name, make, training, sizes = cases()[0]
        check_matches_single_process(name, make, training, sizes, rank, world, average=True)
        check_ddp_composition(rank, world)
        check_state_dict_round_trip(rank, world)
        check_bf16_autocast(rank, world)
        check_indivisible_expert_count()
    finally:
        dist.destroy_process_group()
