import copy
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moe_layers import (
    DenseFFN,
    GShardMoE,
    SBaseMoE,
    SigmaMoE,
    shard_experts,
    sharded_experts,
)
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


@pytest.fixture
def one_rank_mesh():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


D_COMPILE, VOCAB = 8, 20
# three of the routed layers (their routing paths differ), with the graph breaks dynamo counts;
# every layer's compile without expert parallelism is test_compile.py's
ROUTED = [
    (SigmaMoE, dict(n_experts=4, expert_size=3, k=2, entropy_weight=0.1), 4),
    (SBaseMoE, dict(n_experts=4, expert_size=3, k=2), 3),
    (GShardMoE, dict(n_experts=4, expert_size=3, second_policy="all", capacity_factor=1.0), 4),
]


def _compile_step(layer, fn, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, D_COMPILE, generator=gen, requires_grad=True)
    ids = torch.randint(VOCAB, shape, generator=gen)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = fn(x, ids)
    (y.square().sum() + sum(layer.aux_losses.values(), torch.zeros(()))).backward()
    grads = {n: p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
             for n, p in layer.named_parameters()}  # fmt: skip
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("cls, kw, n_breaks", ROUTED, ids=[c.__name__ for c, _, _ in ROUTED])
def test_sharded_experts_compile_with_breaks_only_at_the_exchange(one_rank_mesh, cls, kw, n_breaks):
    """A routed layer whose experts are sharded (a 1-rank expert mesh: the code path of W ranks)
    compiles (aot_eager) to the eager layer's outputs and gradients over three token counts, each
    graph compiled at most twice (static, then with the token count dynamic: the split sizes
    are not guarded on). Its only graph breaks are the dispatcher's `dispatch` and `combine`;
    dynamo counts a break once per Python frame between the compiled function and the break
    (the layer's forward, its routing helpers, the experts' forward): 3 or 4 here, in 4 or 5
    graphs."""
    torch.manual_seed(0)
    layer = cls(D_COMPILE, **kw).train()
    shard_experts(layer, one_rank_mesh)
    eager = lambda x, ids: layer(x, token_ids=ids)
    gen = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(eager)(
        torch.randn(2, 5, D_COMPILE, generator=gen), torch.randint(VOCAB, (2, 5), generator=gen)
    )
    reasons = [b.reason for b in explained.break_reasons]
    assert all(".dispatch`" in r or ".combine`" in r for r in reasons), reasons
    assert sum(".combine`" in r for r in reasons) == 1, reasons
    assert explained.graph_break_count == n_breaks, reasons
    assert explained.graph_count == n_breaks + 1
    torch._dynamo.reset()
    compiled = torch.compile(eager, backend="aot_eager")
    # a third compile of any frame raises
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for seed, shape in enumerate([(2, 5), (3, 6), (2, 7)]):
            got = _compile_step(layer, compiled, shape, seed)
            want = _compile_step(layer, eager, shape, seed)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
