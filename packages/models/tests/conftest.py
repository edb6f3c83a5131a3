"""Small configurations of every architecture with every FFN type, shared by the tests."""

import moe_models
import pytest
import torch
from moe_models import ModelConfig

# the models here are tiny: a second thread only adds synchronisation, which costs 10x on a
# shared, busy machine
torch.set_num_threads(1)

# small sizes for each registered FFN type; the capacity-limited ones drop tokens in training
FFN_OPTIONS = {
    "dense": dict(),
    "sigma_moe": dict(n_experts=4, expert_size=16, k=2, entropy_weight=1e-3),
    "topk": dict(k=8),
    "pkm": dict(n_keys=6, n_heads=2, knn=4),
    "switch": dict(n_experts=4, expert_size=16, capacity_factor=1.0),
    "sbase": dict(n_experts=4, expert_size=16, k=2),
    "gshard": dict(n_experts=4, expert_size=16, capacity_factor=0.5),
    "base": dict(n_experts=4, expert_size=16),
    "hash": dict(n_experts=4, expert_size=16),
    "tmoe": dict(n_experts=4, expert_size=16),
    "token_choice": dict(n_experts=4, expert_size=16, k=2, n_shared_experts=1, z_loss_weight=1e-3),
}


def small_config(arch: str, ffn_type: str, **overrides) -> ModelConfig:
    """A two-layer model of `arch` whose FFN (sMLP: sparse block's channel FFN) is `ffn_type`."""
    base = ModelConfig(
        arch=arch,
        vocab_size=37,
        d_model=32,
        n_layers=2,
        n_heads=2,
        seq_len=16,
        moe_interval=2 if arch == "smlp" else 1,
        smlp_d_ff=48,
        smlp_n_chunks=4,
        d_ff=64,
        ffn={"type": ffn_type, **FFN_OPTIONS[ffn_type]},
    )
    return moe_models.get_config(base, **overrides)


def build_small(arch: str, ffn_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return moe_models.build(small_config(arch, ffn_type, **overrides))


@pytest.fixture(scope="session")
def small():
    """small(arch, ffn_type, seed=0, **overrides) -> model; small.config(...) -> its config."""
    build_small.config = small_config
    return build_small
