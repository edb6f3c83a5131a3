"""No device-to-host read in a training step of any layer (fast impl) but the documented ones,
recorded on CPU tensors by moe_layers.testing.HostReads (what would synchronise on CUDA):

- HashLayer's token-id range check reads min and max on the CPU only (`check_id_range`, an
  asynchronous assert on CUDA and under torch.compile, tested below);
- the BASE auction (BaseLayer, TMoE in training) reads whether a phase has converged, after 1, 2,
  4, ... rounds of each of its phases (`balanced_assignment`'s docstring).

The CPU versions leave the moe_kernels ops closed (on CPU tensors they run the CPU path, which
reads the host; the kernels' own tests show their CUDA path does not); the `triton` versions run
the experts through the Triton kernels (the path CUDA takes) under TRITON_INTERPRET=1 and enter
them.
"""

import os

import pytest
import torch
from moe_kernels.testing import force_backend
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
    balanced_assignment,
)
from moe_layers.base import check_id_range
from moe_layers.base_layer import _eps_phases
from moe_layers.testing import CONVERGED, HostReads, auction_read_bounds

D, L, VOCAB = 8, 6, 20
SCALAR = "aten._local_scalar_dense.default"

# every FFN layer with every option that changes its routing code on
LAYERS = [
    (DenseFFN, dict(d_ff=12, dropout=0.1)),
    (SigmaMoE, dict(n_experts=4, expert_size=3, k=2, entropy_weight=0.1, expert_dropout=0.2)),
    (SigmaMoE, dict(n_experts=4, expert_size=3, k=2, dropout=0.1)),
    (TopKFFN, dict(d_ff=12, k=3)),
    (PKM, dict(n_keys=3, n_heads=2, knn=4)),
    (PKM, dict(n_keys=3, n_heads=2, knn=4, selection="dense", activation="relu")),
    (SwitchMoE, dict(n_experts=4, expert_size=3, capacity_factor=1.0)),
    (SwitchMoE, dict(n_experts=4, expert_size=3, capacity_factor=1.5, capacity_rounding="fairseq")),
    (SBaseMoE, dict(n_experts=4, expert_size=3, k=2, entropy_weight=0.1)),
    (SBaseMoE, dict(n_experts=4, expert_size=3, k=2, balancing="sinkmoid2")),
    (GShardMoE, dict(n_experts=4, expert_size=3, gate_noise=0.1)),
    (GShardMoE, dict(n_experts=4, expert_size=3, second_policy="random")),
    (BaseLayer, dict(n_experts=4, expert_size=3, expert_norm=True)),
    (HashLayer, dict(n_experts=4, expert_size=3, vocab_size=VOCAB)),
    (TMoE, dict(n_experts=4, expert_size=3)),
    (SMoE, dict(n_experts=2, seq_len=L)),
    (SMoE, dict(n_experts=2, seq_len=L, routing="learned")),
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
            dropout=0.1,
        ),
    ),
]
# the reads outside the auction, in order
EXPECTED = {HashLayer: [SCALAR, SCALAR]}
AUCTIONS = {BaseLayer: 1, TMoE: 1}


def ids(cls, kw):
    return cls.__name__ + "".join(f"-{k}={v}" for k, v in kw.items() if k in _SHOWN)


_SHOWN = (
    "expert_dropout",
    "dropout",
    "selection",
    "capacity_rounding",
    "second_policy",
    "routing",
    "balancing",
)


def training_step(layer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, L, D, generator=gen, requires_grad=True)
    token_ids = torch.randint(VOCAB, (2, L), generator=gen)
    y = layer(x, token_ids=token_ids)
    (y.square().sum() + sum(layer.aux_losses.values(), torch.zeros(()))).backward()


def check_layer_reads(cls, kw, into_ops: bool):
    torch.manual_seed(0)
    layer = cls(d_model=D, **kw).train()
    with HostReads(into_ops=into_ops) as reads:
        training_step(layer)
    assert reads.ops == EXPECTED.get(cls, [])
    assert len(reads.auction_reads) == AUCTIONS.get(cls, 0)
    fewest, most = auction_read_bounds(2 * L)
    for auction in reads.auction_reads:
        assert set(auction) == {CONVERGED}
        assert fewest <= len(auction) <= most


@pytest.mark.parametrize("cls, kw", LAYERS, ids=[ids(c, k) for c, k in LAYERS])
def test_training_step_reads_only_the_documented(cls, kw):
    check_layer_reads(cls, kw, into_ops=False)


@pytest.fixture
def triton_experts(monkeypatch):
    """The layers' expert calls forced onto the Triton kernels, the path CUDA takes."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    force_backend(monkeypatch, "triton")


@pytest.mark.triton
@pytest.mark.parametrize("cls, kw", LAYERS, ids=[ids(c, k) for c, k in LAYERS])
def test_training_step_on_the_triton_path_reads_only_the_documented(cls, kw, triton_experts):
    check_layer_reads(cls, kw, into_ops=True)


def test_eval_step_of_base_reads_nothing():
    """Greedy routing in eval: no auction."""
    layer = BaseLayer(D, 4, 3).eval()
    with HostReads(into_ops=False) as reads, torch.no_grad():
        layer(torch.randn(2, L, D))
    assert reads.ops == [] and reads.auction_reads == []


def test_auction_reads_once_per_phase_when_every_phase_converges_in_one_round():
    """cap tokens prefer each expert by a wide margin: every phase ends after its first round,
    so the auction reads exactly once per phase."""
    n_experts, cap = 4, 3
    n_tokens = n_experts * cap
    gen = torch.Generator().manual_seed(0)
    preferred = torch.arange(n_tokens) % n_experts
    scores = 10 * torch.nn.functional.one_hot(preferred, n_experts) + torch.rand(
        n_tokens, n_experts, generator=gen
    )
    with HostReads(into_ops=False) as reads:
        assignment = balanced_assignment(scores)
    assert torch.equal(assignment, preferred)
    assert reads.ops == []
    assert reads.auction_reads == [[CONVERGED] * len(_eps_phases(n_tokens))]


def test_auction_reads_the_score_range_once_when_eps_is_given():
    scores = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    with HostReads(into_ops=False) as reads:
        balanced_assignment(scores, eps=0.01)
    (auction,) = reads.auction_reads
    assert auction[0] == "aten.item.default" and set(auction[1:]) == {CONVERGED}


@pytest.mark.parametrize("shape", [(0, 3), (5, 1)])
def test_auction_reads_nothing_without_a_choice(shape):
    with HostReads(into_ops=False) as reads:
        assignment = balanced_assignment(torch.randn(shape))
    assert torch.equal(assignment, torch.zeros(shape[0], dtype=torch.long))
    assert reads.ops == [] and reads.auction_reads == []


def test_asynchronous_id_check_reads_nothing_and_still_fails():
    good, bad = torch.tensor([0, 3, 19]), torch.tensor([0, 20])
    with HostReads(into_ops=False) as reads:
        check_id_range(good, VOCAB, "token_ids", "vocab_size", asynchronous=True)
    assert reads.ops == []
    with pytest.raises(RuntimeError, match=r"token_ids must lie in \[0, vocab_size=20\)"):
        check_id_range(bad, VOCAB, "token_ids", "vocab_size", asynchronous=True)
    with pytest.raises(ValueError, match=r"vocab_size=20\), got values in \[0, 20\]"):
        check_id_range(bad, VOCAB, "token_ids", "vocab_size")
