import copy
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moe_layers import DenseFFN, GShardMoE, shard_experts, sharded_experts
from moe_layers.parallel import AllToAll
from torch import nn
from torch.distributed.device_mesh import init_device_mesh


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_the_single_process_layer(monkeypatch):
    """Outputs and gradients (inputs, gate, each rank's expert shard) of GShard, BASE, HASH,
    σ-MoE and tMoE with their experts sharded over 2 CPU processes equal the unsharded layer's,
    also with every token routed to one expert and a rank without tokens; the state dict keeps
    the unsharded keys and global shapes. The checks run in tests/ep_worker.py."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import ep_worker

    mp.spawn(ep_worker.run_checks, args=(2, free_port()), nprocs=2, join=True)


def test_one_rank_expert_mesh_is_the_plain_layer_with_gradient():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        x = torch.randn(4, 3, requires_grad=True)
        y = AllToAll.apply(x, [4], [4], None)
        torch.testing.assert_close(y, x)
        (y * 2).sum().backward()
        torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
        torch.manual_seed(0)
        plain = GShardMoE(4, 3, 2).eval()
        model = nn.Sequential(copy.deepcopy(plain))
        shard_experts(model[0], init_device_mesh("cpu", (1,)))
        assert sharded_experts(model) == [model[0].experts]
        assert model[0].experts.w1.shape == (3, 4, 2)
        assert set(model.state_dict()) == {f"0.{k}" for k in plain.state_dict()}
        x = torch.randn(5, 4)
        torch.testing.assert_close(model(x), plain(x))
    finally:
        dist.destroy_process_group()


def test_needs_a_routed_layer():
    with pytest.raises(ValueError, match="RoutedMoE"):
        shard_experts(DenseFFN(4, 8), None)
