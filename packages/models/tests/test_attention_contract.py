"""The attention contract (moe_models.attention) over every registered attention, and attention
as a config part: names, options, overrides, a user's attention, one-line errors."""

import dataclasses
from typing import ClassVar

import moe_models
import pytest
import torch
from moe_models.attention import ARCH_STATE_KIND, check_width
from torch import nn

# small options for the registered attentions that need some; the others take none
ATTENTION_OPTIONS = {"switchhead": dict(n_experts=3, k=2)}


class GatedMeanAttention(nn.Module):
    """A user's attention: each token reads the running mean of the values of the tokens up to
    it (memory included), gated per token."""

    def __init__(self, cfg):
        super().__init__()
        self.d_model = cfg.d_model
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.gate = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x_BLD, mem_BMD):
        check_width(x_BLD, self.d_model, "the attention input")
        if mem_BMD is not None:
            check_width(mem_BMD, self.d_model, "the attention memory")
        ctx_BKD = x_BLD if mem_BMD is None else torch.cat([mem_BMD, x_BLD], dim=1)
        K, L = ctx_BKD.shape[1], x_BLD.shape[1]
        means_BKD = self.v(ctx_BKD).cumsum(1) / torch.arange(1, K + 1)[None, :, None]
        return torch.sigmoid(self.gate(x_BLD)) * means_BKD[:, K - L :]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedMeanConfig:
    d_model: int = 8
    state_kinds: ClassVar[tuple[str, ...]] = ("memory",)

    def build(self):
        return GatedMeanAttention(self)


moe_models.register_attention("gated_mean_test", GatedMeanConfig)


KIND_ARCH = {"memory": "transformer_xl", "cache": "decoder"}


def _model(name: str, arch: str | None = None, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kinds = moe_models.attention_config_class(name).state_kinds
    options = dict(
        arch=arch or KIND_ARCH[kinds[0]],
        d_model=24,
        n_heads=2,
        n_layers=2,
        d_ff=32,
        seq_len=8,
        attention={"type": name, **ATTENTION_OPTIONS.get(name, {})},
    )
    cfg = moe_models.get_config("tiny-dense", **(options | overrides))
    return moe_models.build(cfg)


ATTENTIONS = moe_models.registered_attentions()
# every registered attention in every architecture whose state kind it serves
PAIRS = [
    (name, KIND_ARCH[kind])
    for name in ATTENTIONS
    for kind in moe_models.attention_config_class(name).state_kinds
]


@pytest.mark.parametrize(("name", "arch"), PAIRS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_attention_is_causal(name, arch, mode):
    model = _model(name, arch)
    model.train(mode == "train")
    tokens = torch.randint(0, 256, (2, 8))
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 256
    torch.manual_seed(1)
    a = model(tokens).logits
    torch.manual_seed(1)
    b = model(changed).logits
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize(("name", "arch"), PAIRS)
def test_the_state_gives_the_logits_of_the_whole_sequence(name, arch):
    model = _model(name, arch, mem_len=8).eval()
    tokens = torch.randint(0, 256, (2, 8))
    whole = model(tokens).logits
    out = model(tokens[:, :3], state=model.init_state())
    out = model(tokens[:, 3:4], state=out.state)
    out2 = model(tokens[:, 4:], state=out.state)
    torch.testing.assert_close(out.logits, whole[:, 3:4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2.logits, whole[:, 4:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "arch"), PAIRS)
def test_wrong_widths_are_one_line_errors(name, arch):
    model = _model(name, arch)
    attn = model.layers[0].attn
    with pytest.raises(ValueError, match=r"d_model=24") as err:
        attn(torch.randn(2, 3, 23), None)
    assert "\n" not in str(err.value)
    if ARCH_STATE_KIND[model.config.arch] == "memory":
        with pytest.raises(ValueError, match=r"d_model=24") as err:
            attn(torch.randn(2, 3, 24), torch.randn(2, 4, 25))
        assert "\n" not in str(err.value)


def test_a_users_attention_builds_trains_and_round_trips():
    model = _model("gated_mean_test")
    assert all(isinstance(layer.attn, GatedMeanAttention) for layer in model.layers)
    tokens = torch.randint(0, 256, (2, 8))
    model.train()(tokens, tokens).loss.backward()
    assert model.layers[0].attn.v.weight.grad is not None
    cfg = model.config
    assert cfg.attention.d_model == 24
    again = moe_models.config_from_dict(moe_models.config_to_dict(cfg))
    assert again == cfg and moe_models.attention_name(again.attention) == "gated_mean_test"
    assert moe_models.count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_switchhead_counts_its_chosen_experts_as_active():
    model = _model("switchhead", n_layers=3)
    counts = moe_models.count_parameters(model.config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    per_layer = 2 * 2 * (3 - 2) * 24 * 12  # heads * (experts not chosen) * value+output expert
    assert counts["total"] - counts["active"] == 3 * per_layer


def test_defaults_overrides_and_errors():
    xl = moe_models.get_config("tiny-dense")
    assert moe_models.attention_name(xl.attention) == "relative"
    assert (xl.attention.n_heads, xl.attention.d_head) == (xl.n_heads, xl.head_dim)
    dec = moe_models.get_config("tiny-dense", arch="decoder")
    assert moe_models.attention_name(dec.attention) == "causal"
    assert moe_models.get_config("tiny-dense", n_heads=8).attention.n_heads == 8
    assert moe_models.config_to_dict(xl)["attention"] == {"type": "relative"}
    with pytest.raises(ValueError, match="unknown attention type 'nope'"):
        moe_models.get_config("tiny-dense", attention="nope")
    with pytest.raises(ValueError, match=r"unknown attention option\(s\) \['nope'\]"):
        moe_models.get_config("tiny-dense", **{"attention.nope": "1"})
    with pytest.raises(ValueError, match="needs one of kind 'cache'"):
        moe_models.get_config("tiny-dense", arch="decoder", attention="relative")
    with pytest.raises(ValueError, match="arch 'smlp' has no attention"):
        moe_models.get_config("tiny-smlp", attention="relative")
    with pytest.raises(ValueError, match="state_kinds"):
        moe_models.register_attention("no_kinds", dataclasses.make_dataclass("C", ["d_model"]))
    with pytest.raises(ValueError, match="registered already"):
        moe_models.register_attention("relative", GatedMeanConfig)
