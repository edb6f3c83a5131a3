"""MoEUT: shared layer groups, peri-layernorm, the stack-wide entropy regulariser, its presets."""

import copy

import moe_models
import pytest
import torch
from moe_models.moeut import MoEUTLayer
from torch.nn import functional as F


def _tiny(**overrides):
    torch.manual_seed(0)
    options = dict(vocab_size=50, d_model=16, n_heads=2, d_head=8, seq_len=8) | overrides
    return moe_models.build(moe_models.get_config("tiny-moeut", **options)).double()


def test_one_parameter_per_group_layer_and_the_count_shares_them():
    model = _tiny(n_layers=6, moeut_group_size=3)
    assert len(model.layers) == 3
    cfg = model.config
    counted = moe_models.count_parameters(cfg)
    assert counted["total"] == sum(p.numel() for p in model.parameters())
    assert counted == moe_models.count_parameters(model)
    # six applications of three layers: the active FLOPs of the layers count twice
    twice = moe_models.flops_per_token(cfg)
    once = moe_models.flops_per_token(moe_models.get_config(cfg, n_layers=3))
    assert twice > once


def test_gradients_accumulate_over_the_repeats():
    model = _tiny(n_layers=4, moeut_group_size=2, dropout=0.0).train()
    tokens = torch.randint(0, 50, (2, 8))
    # the same computation with a copy of the group layer per application, unshared
    copies = [copy.deepcopy(model.layers[i % 2]) for i in range(4)]
    model(tokens, tokens).lm_loss.backward()
    x = model.embedding(tokens)
    for c in copies:
        x = c(x, None, tokens)
    logits = model.head(model.norm(x))
    F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    for g in range(2):
        for (name, shared), *unshared in zip(
            model.layers[g].named_parameters(),
            *(copies[i].parameters() for i in range(g, 4, 2)),
            strict=True,
        ):
            total = sum(p.grad for p in unshared)
            torch.testing.assert_close(shared.grad, total, msg=name)


def test_peri_layernorm_leaves_the_residual_stream_raw():
    model = _tiny(n_layers=2, moeut_group_size=2).eval()
    layer = model.layers[0]
    assert isinstance(layer, MoEUTLayer) and layer.attn_norm is None
    assert layer.attn.config.peri_norm and layer.attn.norm is not None and model.norm is not None
    seen = {}
    layer.ffn.ffn.experts.register_forward_pre_hook(lambda m, args: seen.update(experts=args[0]))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    tokens = torch.zeros(2, 5, dtype=torch.long)
    y = layer(x, None, tokens)
    # the experts read the block's raw input (the residual after attention), not its norm
    after_attn = x + layer.attn(x, None)
    torch.testing.assert_close(seen["experts"], after_attn.reshape(-1, 16))
    # norms only in front of softmax/sigmoid inputs: the layer is positively homogeneous
    # (with LayerNorm's eps 0), which a pre-LN layer (x + f(LN(x))) is not
    layer.attn.norm.eps = layer.ffn.norm.eps = 0.0
    y = layer(x, None, tokens)
    torch.testing.assert_close(layer(3 * x, None, tokens), 3 * y, rtol=1e-9, atol=1e-9)
    torch.manual_seed(0)
    xl = moe_models.build(moe_models.get_config("tiny-dense", d_model=16, n_heads=2)).double()
    pre = xl.layers[0].eval()
    assert not torch.allclose(pre(3 * x, None, tokens), 3 * pre(x, None, tokens), rtol=1e-3)


def _neg_entropy(logits):
    """-H of the mean over the rows of softmax(logits), over the last dimension."""
    p = torch.softmax(logits, -1).mean(0)
    return (p * p.log()).sum(-1)


def test_the_entropy_regulariser_spans_the_stack():
    model = _tiny(n_layers=4, moeut_group_size=2, dropout=0.0).train()
    inputs = {0: [], 1: []}
    for g, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(lambda m, args, g=g: inputs[g].append(args[0]))
    tokens = torch.randint(0, 50, (2, 8))
    out = model(tokens, tokens)
    ffn_terms, attn_terms = [], []
    for g, layer in enumerate(model.layers):
        xs = inputs[g]  # the layer's input at each of its two applications
        assert len(xs) == 2
        n = [layer.attn.norm(x).reshape(-1, 16) for x in xs]
        h_e = (2, 4)
        v = torch.cat([layer.attn.sel_v(t).view(-1, *h_e) for t in n])
        o = torch.cat([layer.attn.sel_o(t).view(-1, *h_e) for t in n])
        attn_terms.append(_neg_entropy(v).mean() + _neg_entropy(o).mean())
        mids = [x + layer.attn(x, None) for x in xs]
        gate = layer.ffn.ffn.router.gate
        logits = torch.cat([layer.ffn.norm(m).reshape(-1, 16) @ gate.T for m in mids])
        ffn_terms.append(_neg_entropy(logits))
    torch.testing.assert_close(out.aux_losses["entropy"], 1e-2 * torch.stack(ffn_terms).mean())
    torch.testing.assert_close(
        out.aux_losses["attention_entropy"], 1e-3 * torch.stack(attn_terms).mean()
    )
    assert set(out.aux_losses) == {"entropy", "attention_entropy"}
    assert model.eval()(tokens, tokens).aux_losses == {}


def test_bad_group_sizes_are_one_line_errors():
    with pytest.raises(ValueError, match="n_layers=5 must be a multiple of moeut_group_size=2"):
        moe_models.get_config("tiny-moeut", n_layers=5)
    with pytest.raises(ValueError, match="moeut_group_size must be a positive integer"):
        moe_models.get_config("tiny-moeut", moeut_group_size=0)


@pytest.mark.parametrize(
    ("preset", "twin"),
    [
        ("tiny-moeut", "tiny-moeut-dense"),
        ("tiny-switchhead", "tiny-switchhead-dense"),
        ("moeut-44m", "moeut-dense-44m"),
        ("moeut-318m", "moeut-dense-318m"),
        ("moeut-1b", "moeut-dense-1b"),
        ("switchhead-wt103-47m", "dense-wt103-small"),
        ("switchhead-wt103-262m", "dense-wt103-big"),
    ],
)
def test_the_dense_baselines_hold_as_many_parameters(preset, twin):
    a = moe_models.count_parameters(moe_models.get_config(preset))["total"]
    b = moe_models.count_parameters(moe_models.get_config(twin))["total"]
    assert abs(a - b) / b < 0.01, (a, b)


@pytest.mark.parametrize("preset", ["tiny-moeut", "tiny-switchhead"])
def test_dense_twin_refuses_what_it_cannot_make_dense(preset):
    with pytest.raises(ValueError, match="dense_twin replaces FFNs only") as err:
        moe_models.dense_twin(moe_models.get_config(preset))
    assert "\n" not in str(err.value)
