"""Every architecture learns with every FFN type: the loss falls when fitting one tiny batch."""

import moe_models
import pytest
import torch
from moe_models.config import ARCHS
from moe_models.registry import BUILTIN_FFNS


def fit(model, tokens, targets, steps=30, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(tokens, targets)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    return losses


# one layer (sMLP: one sparse block, whose channel FFN is the FFN type)
CASES = [(a, f) for a in ARCHS for f in list(BUILTIN_FFNS)]


@pytest.mark.parametrize("arch,ffn", CASES)
def test_loss_falls_on_one_batch(small, arch, ffn):
    model = small(arch, ffn, seed=1, n_layers=1, moe_interval=1)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 37, (4, 16), generator=g)
    targets = torch.randint(0, 37, (4, 16), generator=g)
    losses = fit(model, tokens, targets)
    # ln(37) = 3.6 nats at chance; memorising 64 random targets must get well below it
    assert losses[-1] < 0.5 * losses[0], losses[::5]


@pytest.mark.parametrize("name", ["tiny-sigma-moe", "tiny-gshard", "tiny-smlp"])
def test_tiny_presets_learn(name):
    torch.manual_seed(0)
    model = moe_models.build(name, dropout=0.0, n_layers=2, d_model=64)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (2, 17), generator=g)
    losses = fit(model, tokens[:, :-1], tokens[:, 1:], steps=20, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0], losses[::5]
