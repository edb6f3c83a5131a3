"""Layers users bring: a registered config class builds inside every architecture."""

import dataclasses

import moe_layers
import moe_models
import pytest
import torch
from moe_models.config import ARCHS
from torch import nn


class ScaledFFN(moe_layers.MoEModule):
    """A user's layer: y = s * W2 relu(W1 x), with its own options and an auxiliary loss."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(moe_layers.LayerConfig):
        d_ff: int = 16
        scale: float = 0.5
        n_layers: int = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.w1 = nn.Linear(self.config.d_model, self.config.d_ff)
        self.w2 = nn.Linear(self.config.d_ff, self.config.d_model)

    def forward_tokens(self, x_TD, token_ids_T):
        y_TD = self.config.scale * self.w2(self.w1(x_TD).relu())
        if self.training:
            self.record_aux_loss("scaled_l1", y_TD.abs().mean())
        return y_TD


moe_models.register_ffn("scaled_test_ffn", ScaledFFN.Config)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_registered_layer_builds_in_every_architecture(small, arch):
    model = small(arch, "dense", 0, ffn={"type": "scaled_test_ffn", "scale": 2.0})
    layers = [m for m in model.modules() if isinstance(m, ScaledFFN)]
    assert layers, "the user's layer is in the model"
    for layer in layers:
        # the model fills its own fields and lends its d_ff; the options are the user's
        assert (layer.config.d_model, layer.config.n_layers) == (32, 2)
        assert (layer.config.d_ff, layer.config.scale) == (64, 2.0)
    tokens = torch.randint(0, 37, (2, 8))
    out = model.train()(tokens, tokens)
    assert set(out.aux_losses) == {"scaled_l1"}
    out.loss.backward()
    cfg = model.config
    again = moe_models.config_from_dict(moe_models.config_to_dict(cfg))
    assert again == cfg and moe_models.ffn_name(again.ffn) == "scaled_test_ffn"
    counts = moe_models.count_parameters(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_overrides_reach_a_registered_layers_options(small):
    cfg = small.config("decoder", "dense", ffn="scaled_test_ffn", **{"ffn.scale": "0.25"})
    assert cfg.ffn.scale == 0.25
    with pytest.raises(ValueError, match=r"unknown config override\(s\) \['nope'\]"):
        small.config("decoder", "dense", ffn="scaled_test_ffn", nope=1)
