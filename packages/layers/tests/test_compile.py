"""torch.compile(fullgraph=True) of every layer, in training and eval mode: the compiled layer's
output and gradients equal the eager layer's, and batches of other token counts recompile at
most once (the first call compiles for static shapes, the second with the token count dynamic,
then no more). A graph break would fail fullgraph. `aot_eager` for all (inductor's code
generation is slow on small CI machines), inductor for one layer."""

import moe_layers
import pytest
import torch
from moe_layers import (
    PKM,
    BaseLayer,
    DenseFFN,
    GShardMoE,
    HashLayer,
    SBaseMoE,
    SigmaMoE,
    SMoE,
    SwitchMoE,
    TMoE,
    TokenChoiceMoE,
    TopKFFN,
)
from torch._dynamo.testing import CompileCounterWithBackend

D, VOCAB = 8, 20
# leading shapes of the calls: three token counts (no size 1, which dynamo specialises on),
# every sequence shorter than SMoE's seq_len and longer than its routing prefix (a slice that
# takes a whole dimension is specialised on too)
SHAPES = [(2, 5), (3, 6), (2, 7)]

LAYERS = [
    (DenseFFN, dict(d_ff=12)),
    (SigmaMoE, dict(n_experts=4, expert_size=3, k=2, entropy_weight=0.1)),
    (TopKFFN, dict(d_ff=12, k=3)),
    (PKM, dict(n_keys=3, n_heads=2, knn=4)),
    (PKM, dict(n_keys=3, n_heads=2, knn=4, selection="dense", activation="relu")),
    (SwitchMoE, dict(n_experts=4, expert_size=3, capacity_factor=1.0)),
    (SwitchMoE, dict(n_experts=4, expert_size=3, capacity_factor=1.5, capacity_rounding="fairseq")),
    (SBaseMoE, dict(n_experts=4, expert_size=3, k=2, entropy_weight=0.1)),
    (SBaseMoE, dict(n_experts=4, expert_size=3, k=2, balancing="sinkmoid2")),
    (GShardMoE, dict(n_experts=4, expert_size=3, second_policy="all")),
    (BaseLayer, dict(n_experts=4, expert_size=3)),
    (HashLayer, dict(n_experts=4, expert_size=3, vocab_size=VOCAB)),
    (TMoE, dict(n_experts=4, expert_size=3)),
    (SMoE, dict(n_experts=2, seq_len=8)),
    (SMoE, dict(n_experts=2, seq_len=8, routing="learned", prefix_fraction=0.4)),
    (
        TokenChoiceMoE,
        dict(n_experts=4, expert_size=3, k=2, z_loss_weight=0.1, balance_loss_weight=0.1),
    ),
    (
        TokenChoiceMoE,
        dict(
            n_experts=4,
            expert_size=3,
            k=2,
            score="sigmoid",
            n_groups=2,
            topk_groups=1,
            bias_update_rate=0.1,
            n_shared_experts=1,
            shared_expert_gate=True,
        ),
    ),
]


def _name(cls, kw):
    extra = [
        f"{k}={kw[k]}"
        for k in ("selection", "capacity_rounding", "routing", "balancing")
        if k in kw
    ]
    return "-".join([cls.__name__, *extra])


def _inputs(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, D, generator=gen), torch.randint(VOCAB, shape, generator=gen)


def _step(layer, fn, x, token_ids):
    """Output, input gradient, parameter gradients, auxiliary losses and routing statistics of
    one forward and backward of sum(y²) + aux."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = fn(x, token_ids)
    aux = {k: v.detach() for k, v in layer.aux_losses.items()}
    stats = layer.routing_stats
    if stats is not None:
        assert type(stats.n_tokens) is int
        stats = (stats.expert_counts, stats.n_tokens, stats.dropped_count, stats.entropy_nats)
    (y.square().sum() + sum(layer.aux_losses.values(), torch.zeros(()))).backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, aux, stats


def check_compiled_matches_eager(layer, backend, shapes=SHAPES) -> int:
    """Compiled and eager agree on every call; returns the number of compiled frames."""
    counter = CompileCounterWithBackend(backend)
    eager = lambda x, ids: layer(x, token_ids=ids)
    compiled = torch.compile(eager, fullgraph=True, backend=counter)
    for i, shape in enumerate(shapes):
        x, token_ids = _inputs(shape, seed=i)
        torch.manual_seed(i)
        got = _step(layer, compiled, x, token_ids)
        torch.manual_seed(i)
        want = _step(layer, eager, x, token_ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    return counter.frame_count


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls, kw", LAYERS, ids=[_name(c, k) for c, k in LAYERS])
def test_fullgraph_compile_matches_eager_and_recompiles_at_most_once(cls, kw, training):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = cls(d_model=D, **kw).train(training)
    assert check_compiled_matches_eager(layer, "aot_eager") <= 2


def test_inductor_compile_matches_eager():
    """One shape, one compilation: inductor's code generation is slow on a small machine."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = SigmaMoE(D, 4, 3, 2, entropy_weight=0.1).train()
    assert check_compiled_matches_eager(layer, "inductor", SHAPES[:1]) == 1


def test_compiled_forwards_add_their_load_too():
    """Under torch.compile (fullgraph) the forward's load accumulation is kept, so the bias
    still moves in a compiled model."""
    torch.manual_seed(0)
    layer = TokenChoiceMoE(8, 4, 3, 2, bias_update_rate=0.1).train()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    total = 0
    for n in (10, 12, 7):
        compiled(torch.randn(n, 8)).sum().backward()
        total = total + layer.routing_stats.expert_counts
    torch.testing.assert_close(layer.router.pending_load, total)
    moe_layers.after_optimizer_step(layer)
    assert layer.router.expert_bias.abs().max() > 0
