"""No device-to-host read in a training step (forward and backward) of any tiny preset but the
documented ones, recorded on CPU tensors by moe_layers.testing.HostReads (what would synchronise
on CUDA):

- the token range check reads min and max on the CPU only (`check_tokens`; one asynchronous
  assert on CUDA and under torch.compile, tested below), and so does each HashLayer's;
- each BASE auction (the base and tMoE layers in training) reads whether its phases converged
  (moe_layers.balanced_assignment's docstring), one list of reads per call.

The CPU versions leave the moe_kernels ops closed (on CPU tensors they run their CPU path, which
reads the host); the `triton` versions force the experts onto the Triton kernels under
TRITON_INTERPRET=1 and enter them.
"""

import os

import moe_models
import pytest
import torch
from moe_kernels.testing import force_backend
from moe_layers import BaseLayer, HashLayer
from moe_layers.testing import CONVERGED, HostReads, auction_read_bounds

SCALAR = "aten._local_scalar_dense.default"
# the size-only twins that test_compile.py leaves out (it checks that they are)
SAME_STRUCTURE = {
    "tiny-olmoe-dense-compute",
    "tiny-deepseek-dense-params",
    "tiny-deepseek-dense-compute",
    "tiny-switchhead-dense",
}
TINY = [n for n in moe_models.presets() if n.startswith("tiny-") and n not in SAME_STRUCTURE]
B, L = 2, 8


def _has_experts(name: str) -> bool:
    cfg = moe_models.get_config(name)
    moe = any(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    return moe and hasattr(cfg.ffn, "expert_size")


# under the Triton interpreter: the presets whose layers call the expert kernels, narrower
WITH_EXPERTS = [name for name in TINY if _has_experts(name)]
NARROW = dict(d_model=32, n_heads=2, d_ff=64, smlp_d_ff=64, expert_size=8)


def expected_reads(model) -> tuple[list[str], int]:
    """The reads outside the auctions of one training forward and backward, in order, and the
    number of auctions."""
    modules = list(model.modules())
    hash_layers = sum(isinstance(m, HashLayer) for m in modules)
    auctions = sum(
        isinstance(m, BaseLayer) and m.router.train_routing == "balanced" for m in modules
    )
    return [SCALAR, SCALAR] * (1 + hash_layers), auctions


def check_training_steps(name: str, into_ops: bool, **overrides) -> None:
    """Two steps, the second given the first's state (the Transformer-XL memory)."""
    torch.manual_seed(0)
    model = moe_models.build(name, **overrides).train()
    tokens = torch.randint(
        model.config.vocab_size, (2, B, L), generator=torch.Generator().manual_seed(0)
    )
    state = None
    with HostReads(into_ops=into_ops) as reads:
        for step in range(2):
            out = model(tokens[step], tokens[step], state=state)
            out.loss.backward()
            state = out.state
    ops, auctions = expected_reads(model)
    assert reads.ops == ops * 2
    assert len(reads.auction_reads) == 2 * auctions
    fewest, most = auction_read_bounds(B * L)
    for auction in reads.auction_reads:
        assert set(auction) == {CONVERGED} and fewest <= len(auction) <= most


@pytest.mark.parametrize("name", TINY)
def test_training_steps_read_only_the_documented(name):
    check_training_steps(name, into_ops=False)


@pytest.fixture
def triton_experts(monkeypatch):
    """The experts' kernel calls forced onto the Triton kernels, the path CUDA takes."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    force_backend(monkeypatch, "triton")


@pytest.mark.triton
@pytest.mark.parametrize("name", WITH_EXPERTS)
def test_training_steps_on_the_triton_path_read_only_the_documented(name, triton_experts):
    check_training_steps(name, into_ops=True, **NARROW)


def test_token_check_is_asynchronous_under_compile_and_still_fails():
    """Compiled, the range check is one torch._assert_async: no graph break (fullgraph), and
    out-of-range tokens still fail (a RuntimeError instead of the eager ValueError)."""
    torch._dynamo.reset()
    model = moe_models.build("tiny-dense").eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    good = torch.randint(256, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(compiled(good).logits, model(good).logits)
        bad = good.clone()
        bad[1, 3] = 256
        with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=256\)"):
            model(bad)
        with pytest.raises(RuntimeError, match=r"tokens must lie in \[0, vocab_size=256\)"):
            compiled(bad)
