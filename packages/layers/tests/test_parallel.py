import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moe_layers import DenseFFN, ExpertParallel, GShardMoE, expert_parameter_names
from moe_layers.parallel import AllToAll
from torch import nn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_the_single_process_layer(monkeypatch):
    """Outputs and gradients (inputs, gate, each rank's expert shard) of GShard, BASE, HASH,
    σ-MoE and tMoE sharded over 2 CPU processes equal the unsharded layer's; the state dict
    round-trips between sharded and whole; composed with DDP, gradients are the averaged ones.
    The checks run in tests/ep_worker.py."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import ep_worker

    mp.spawn(ep_worker.run_checks, args=(2, free_port()), nprocs=2, join=True)


def test_all_to_all_single_rank_is_identity_with_gradient():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        x = torch.randn(4, 3, requires_grad=True)
        y = AllToAll.apply(x, [4], [4], None)
        torch.testing.assert_close(y, x)
        (y * 2).sum().backward()
        torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
        model = nn.Sequential(ExpertParallel(GShardMoE(4, 3, 2)))
        assert expert_parameter_names(model) == ["0.layer.experts.w1", "0.layer.experts.w2"]
        assert model[0].layer.experts.w1.shape == (3, 4, 2)
        assert set(model[0].full_state_dict()) == set(GShardMoE(4, 3, 2).state_dict())
    finally:
        dist.destroy_process_group()


def test_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        ExpertParallel(GShardMoE(4, 2, 2))


def test_needs_a_routed_layer():
    with pytest.raises(ValueError, match="RoutedMoE"):
        ExpertParallel(DenseFFN(4, 8))
