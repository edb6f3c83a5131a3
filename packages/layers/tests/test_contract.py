"""The layer contract, table-driven over every exported layer: Config objects (round trip, frozen,
keyword-only, build), signatures, validation, the forward contract, auxiliary losses reset between
calls, analytic parameter counts; and the one meaning of the capacity options in eval mode."""

import dataclasses
import inspect
import math
import re

import moe_layers
import pytest
import torch
from moe_layers import (
    PKM,
    BaseLayer,
    CausalSGU,
    DenseFFN,
    GShardMoE,
    HashLayer,
    SBaseMoE,
    SigmaMoE,
    SMoE,
    SwitchHead,
    SwitchMoE,
    TMoE,
    TokenChoiceMoE,
    TopKFFN,
)

D, T, VOCAB = 8, 5, 20

# (class, small constructor kwargs); regularisers on, so that training records auxiliary losses
LAYERS = [
    (DenseFFN, dict(d_model=D, d_ff=12)),
    (SigmaMoE, dict(d_model=D, n_experts=4, expert_size=3, k=2, entropy_weight=0.1)),
    (TopKFFN, dict(d_model=D, d_ff=12, k=3)),
    (PKM, dict(d_model=D, n_keys=3, n_heads=2, knn=4)),
    (SwitchMoE, dict(d_model=D, n_experts=4, expert_size=3, capacity_factor=1.0)),
    (SBaseMoE, dict(d_model=D, n_experts=4, expert_size=3, k=2, entropy_weight=0.1)),
    (GShardMoE, dict(d_model=D, n_experts=4, expert_size=3)),
    (BaseLayer, dict(d_model=D, n_experts=4, expert_size=3)),
    (HashLayer, dict(d_model=D, n_experts=4, expert_size=3, vocab_size=VOCAB)),
    (TMoE, dict(d_model=D, n_experts=4, expert_size=3)),
    (SMoE, dict(d_model=D, n_experts=2, seq_len=T)),
    (
        TokenChoiceMoE,
        dict(d_model=D, n_experts=4, expert_size=3, k=2, n_shared_experts=1, z_loss_weight=0.1),
    ),
    (CausalSGU, dict(d_ffn=D, seq_len=T)),
    (SwitchHead, dict(d_model=D, n_heads=2, n_experts=3, k=2, entropy_weight=0.1)),
]
# CausalSGU maps [..., T, d_ffn] -> [..., T, d_ffn // 2] and SwitchHead is self-attention (its
# contract is tested in test_switchhead.py and by the models' attention contract): no FFN blocks
FFN_LAYERS = [(cls, kw) for cls, kw in LAYERS if cls not in (CausalSGU, SwitchHead)]
AUX_IN_TRAINING = {
    SigmaMoE: {"entropy"},
    SBaseMoE: {"entropy"},
    SwitchMoE: {"switch_balance"},
    GShardMoE: {"gshard_balance"},
    TokenChoiceMoE: {"router_z"},
}


def ids_of(cls):
    return cls.__name__


def inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, T, D, generator=gen, dtype=dtype), torch.randint(VOCAB, (2, T))


def test_table_covers_every_exported_layer():
    exported = {
        getattr(moe_layers, name)
        for name in moe_layers.__all__
        if getattr(getattr(moe_layers, name), "Config", None) is not None
    }
    assert exported == {cls for cls, _ in LAYERS}


@pytest.mark.parametrize("cls, kw", LAYERS, ids=[ids_of(c) for c, _ in LAYERS])
def test_config_round_trip_frozen_keyword_only_and_build(cls, kw):
    cfg = cls.Config(**kw)
    d = cfg.to_dict()
    assert list(d) == [f.name for f in dataclasses.fields(cls.Config)]
    assert cls.Config(**d) == cfg
    first = next(iter(d))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, first, d[first])
    with pytest.raises(TypeError):
        cls.Config(*kw.values())
    torch.manual_seed(0)
    built = cfg.build()
    assert type(built) is cls and built.config == cfg
    torch.manual_seed(0)
    direct = cls(**kw)
    assert direct.config == cfg
    assert cls.from_config(cfg).config == cfg
    # the same layer: same parameters drawn from the same seed
    assert built.state_dict().keys() == direct.state_dict().keys()
    for key, value in built.state_dict().items():
        assert torch.equal(value, direct.state_dict()[key]), key
    # the positional fields may be given positionally, as the layers always took them
    positional = [kw[name] for name in cls.Config.positional if name in kw]
    rest = {k: v for k, v in kw.items() if k not in cls.Config.positional}
    assert cls(*positional, **rest).config == cfg


@pytest.mark.parametrize("cls, kw", LAYERS, ids=[ids_of(c) for c, _ in LAYERS])
def test_signature_is_the_config(cls, kw):
    params = inspect.signature(cls).parameters
    fields = dataclasses.fields(cls.Config)
    empty = inspect.Parameter.empty
    assert [(p.name, p.default) for p in params.values()] == [
        (f.name, empty if f.default is dataclasses.MISSING else f.default) for f in fields
    ]
    positional = [
        p.name for p in params.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    assert positional == list(cls.Config.positional)
    too_many = [*(kw.get(name, 1) for name in params), 1]
    with pytest.raises(TypeError, match=cls.__name__):
        cls(*too_many)


# (class, field, bad value): each must raise a ValueError naming the field and the value
BAD_VALUES = [
    (DenseFFN, "d_model", 0),
    (DenseFFN, "d_model", True),
    (DenseFFN, "d_ff", 0),
    (DenseFFN, "n_layers", 2.0),
    (DenseFFN, "dropout", 1.0),
    (DenseFFN, "activation", "tanh"),
    (DenseFFN, "bias", "yes"),
    (SigmaMoE, "n_experts", 0),
    (SigmaMoE, "expert_size", 2.5),
    (SigmaMoE, "k", 5),
    (SigmaMoE, "k", True),
    (SigmaMoE, "expert_dropout", 1.0),
    (SigmaMoE, "entropy_weight", float("nan")),
    (SigmaMoE, "entropy_weight", float("inf")),
    (SigmaMoE, "dropout", -0.1),
    (SigmaMoE, "activation", "tanh"),
    (SigmaMoE, "init", "xavier"),
    (SigmaMoE, "impl", "cuda"),
    (TopKFFN, "d_ff", 0),
    (TopKFFN, "k", 13),
    (TopKFFN, "dropout", 1.0),
    (TopKFFN, "activation", "softmax"),
    (TopKFFN, "impl", "triton"),
    (PKM, "d_model", 7),
    (PKM, "n_keys", 0),
    (PKM, "n_heads", 1.5),
    (PKM, "knn", 10),
    (PKM, "activation", "sigmoid"),
    (PKM, "value_init", "xavier"),
    (PKM, "selection", "sparse"),
    (PKM, "selection", True),
    (SwitchMoE, "expert_size", 0),
    (SwitchMoE, "capacity_factor", 0.0),
    (SwitchMoE, "capacity_factor", float("nan")),
    (SwitchMoE, "eval_capacity_factor", -1.0),
    (SwitchMoE, "load_balance_weight", float("nan")),
    (SwitchMoE, "balance_variant", "gshard"),
    (SwitchMoE, "init", "orthogonal"),
    (SwitchMoE, "dropout", 1.0),
    (SwitchMoE, "capacity_rounding", "floor"),
    (SwitchMoE, "init_scale", 0.0),
    (SwitchMoE, "init_scale", float("inf")),
    (SwitchMoE, "init_scale", True),
    (SwitchMoE, "normalize_gate_rows", 1),
    (SBaseMoE, "k", 5),
    (SBaseMoE, "sinkhorn_iters", -1),
    (SBaseMoE, "sinkhorn_iters", 1.5),
    (SBaseMoE, "expert_dropout", 1.0),
    (SBaseMoE, "entropy_weight", float("nan")),
    (SBaseMoE, "impl", "x"),
    (GShardMoE, "second_policy", "top3"),
    (GShardMoE, "capacity_factor", 0),
    (GShardMoE, "eval_capacity_factor", float("inf")),
    (GShardMoE, "load_balance_weight", -1.0),
    (GShardMoE, "gate_noise", float("nan")),
    (GShardMoE, "normalize_after_drop", "yes"),
    (GShardMoE, "dropout", 1.0),
    (BaseLayer, "n_experts", 0),
    (BaseLayer, "train_routing", "sinkhorn"),
    (BaseLayer, "dropout", 1.0),
    (BaseLayer, "activation", "tanh"),
    (BaseLayer, "zero_init_output", "yes"),
    (BaseLayer, "expert_norm", 0),
    (HashLayer, "vocab_size", 0),
    (HashLayer, "hash", "md5"),
    (HashLayer, "seed", 1.5),
    (HashLayer, "n_layers", 0),
    (TMoE, "expert_size", 0),
    (TMoE, "routing", "sinkhorn"),
    (TMoE, "impl", "x"),
    (SMoE, "d_model", 7),
    (SMoE, "seq_len", 0),
    (SMoE, "routing", "hash"),
    (SMoE, "prefix_fraction", 1.0),
    (SMoE, "prefix_fraction", float("nan")),
    (SMoE, "impl", "x"),
    (TokenChoiceMoE, "n_experts", 0),
    (TokenChoiceMoE, "k", 5),
    (TokenChoiceMoE, "activation", "geglu"),
    (TokenChoiceMoE, "n_shared_experts", -1),
    (TokenChoiceMoE, "shared_expert_size", 0),
    (TokenChoiceMoE, "shared_expert_gate", 1),
    (TokenChoiceMoE, "score", "tanh"),
    (TokenChoiceMoE, "softmax_after_topk", "yes"),
    (TokenChoiceMoE, "route_scale", 0.0),
    (TokenChoiceMoE, "n_groups", 3),
    (TokenChoiceMoE, "topk_groups", 2),
    (TokenChoiceMoE, "z_loss_weight", float("nan")),
    (TokenChoiceMoE, "balance_loss_weight", -1.0),
    (TokenChoiceMoE, "balance_scope", "batch"),
    (TokenChoiceMoE, "bias_update_rate", -1.0),
    (TokenChoiceMoE, "bias_update_rate", float("inf")),
    (TokenChoiceMoE, "init_std", 0.0),
    (TokenChoiceMoE, "dropout", 1.0),
    (TokenChoiceMoE, "impl", "x"),
    (CausalSGU, "d_ffn", 5),
    (CausalSGU, "d_ffn", 0),
    (CausalSGU, "seq_len", 0),
    (SwitchHead, "k", 4),
    (SwitchHead, "positions", "abs"),
]


@pytest.mark.parametrize(
    "cls, field, value", BAD_VALUES, ids=[f"{c.__name__}-{f}-{v!r}" for c, f, v in BAD_VALUES]
)
def test_bad_value_names_the_field_and_the_value(cls, field, value):
    kw = dict(LAYERS)[cls] | {field: value}
    for make in (cls.Config, cls):
        with pytest.raises(ValueError) as err:
            make(**kw)
        message = str(err.value)
        assert re.search(rf"\b{field}\b", message), message
        assert repr(value) in message, message


def test_hash_layer_needs_its_vocabulary():
    with pytest.raises(TypeError, match="vocab_size"):
        HashLayer(D, 4, 3)


@pytest.mark.parametrize("cls, kw", FFN_LAYERS, ids=[ids_of(c) for c, _ in FFN_LAYERS])
def test_wrong_width_names_d_model(cls, kw):
    layer = cls(**kw)
    x, ids = inputs()
    with pytest.raises(ValueError, match=rf"d_model={D}.*\(2, {T}, {D + 1}\)"):
        layer(torch.randn(2, T, D + 1), token_ids=ids)
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.tensor(1.0))


def test_wrong_width_is_an_error_not_scrambled_tokens():
    with pytest.raises(ValueError, match="d_model=16"):
        SigmaMoE(16, 4, 8, 2)(torch.randn(4, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls, kw", FFN_LAYERS, ids=[ids_of(c) for c, _ in FFN_LAYERS])
def test_forward_contract(cls, kw, dtype):
    layer = cls(**kw).to(dtype).eval()
    x, ids = inputs(dtype)
    y = layer(x, token_ids=ids)
    assert y.shape == x.shape and y.dtype == x.dtype
    with pytest.raises(TypeError):
        layer(x, ids)  # token_ids is keyword-only
    with pytest.raises(ValueError, match="token_ids must have shape"):
        layer(x, token_ids=ids[:, :-1])
    with pytest.raises(ValueError, match="integer"):
        layer(x, token_ids=ids.float())
    if cls is HashLayer:
        with pytest.raises(ValueError, match="token_ids"):
            layer(x)
    else:
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("cls, kw", FFN_LAYERS, ids=[ids_of(c) for c, _ in FFN_LAYERS])
def test_aux_losses_are_reset_between_calls(cls, kw):
    torch.manual_seed(0)
    layer = cls(**kw).train()
    x, ids = inputs()
    layer.record_aux_loss("stale", torch.tensor(1.0))
    layer(x, token_ids=ids)
    assert set(layer.aux_losses) == AUX_IN_TRAINING.get(cls, set())
    layer.record_aux_loss("stale", torch.tensor(1.0))
    layer.eval()(x, token_ids=ids)
    assert layer.aux_losses == {}
    assert moe_layers.collect_aux_losses(layer) == {}


def test_aux_losses_off_with_their_weight():
    x, _ = inputs()
    for layer in [
        SigmaMoE(D, 4, 3, 2, entropy_weight=0.1),
        SwitchMoE(D, 4, 3, load_balance_weight=0.1),
    ]:
        layer.train()(x)
        assert layer.aux_losses
        off = type(layer)(**(layer.config.to_dict() | _weight_off(layer)))
        off.load_state_dict(layer.state_dict())
        off.train()(x)
        assert off.aux_losses == {}


def _weight_off(layer):
    return {"entropy_weight": 0.0} if isinstance(layer, SigmaMoE) else {"load_balance_weight": 0}


def _per_expert(layer) -> int:
    return sum(p.numel() for p in layer.experts.parameters()) // layer.experts.w1.shape[0]


def _router(layer) -> int:
    return sum(p.numel() for p in layer.router.parameters())


# the parameters one token's output uses, from the built layer's parameter shapes
ACTIVE = {
    DenseFFN: lambda m: sum(p.numel() for p in m.parameters()),
    SMoE: lambda m: sum(p.numel() for p in m.parameters()),
    CausalSGU: lambda m: sum(p.numel() for p in m.parameters()),
    SigmaMoE: lambda m: _router(m) + m.config.k * _per_expert(m),
    SBaseMoE: lambda m: _router(m) + m.config.k * _per_expert(m),
    SwitchMoE: lambda m: _router(m) + _per_expert(m),
    BaseLayer: lambda m: (
        _router(m)
        + _per_expert(m)
        + (0 if m.expert_norm is None else m.expert_norm.weight.shape[1] * 2)
    ),
    TMoE: lambda m: _router(m) + _per_expert(m),
    HashLayer: lambda m: _router(m) + _per_expert(m),
    GShardMoE: lambda m: _router(m) + min(2, m.config.n_experts) * _per_expert(m),
    TopKFFN: lambda m: (
        m.w1.numel()
        + (0 if m.b1 is None else m.b1.numel() + m.b2.numel())
        + m.config.k * m.w2.shape[1]
    ),
    TokenChoiceMoE: lambda m: (
        _router(m)
        + m.config.k * _per_expert(m)
        + (0 if m.shared is None else sum(p.numel() for p in m.shared.parameters()))
    ),
    # every head's q, k (and XL) maps and selectors, but only k of its E value and output experts
    SwitchHead: lambda m: (
        sum(p.numel() for p in m.parameters())
        - (m.w_v.numel() + m.w_o.numel()) // m.n_experts * (m.n_experts - m.config.k)
    ),
    # the dense path reads every value row
    PKM: lambda m: (
        m.keys.numel()
        + (
            m.values.shape[0]
            if m.config.dense_path
            else min(m.config.n_heads * m.config.knn, m.values.shape[0])
        )
        * m.values.shape[1]
    ),
}

SIZES = [
    *LAYERS,
    (DenseFFN, dict(d_model=5, d_ff=3, bias=False)),
    (SigmaMoE, dict(d_model=5, n_experts=7, expert_size=2, k=7)),
    (SigmaMoE, dict(d_model=3, n_experts=1, expert_size=9, k=1)),
    (TopKFFN, dict(d_model=3, d_ff=5, k=5, bias=False)),
    (PKM, dict(d_model=6, n_keys=2, n_heads=3, knn=4)),
    (PKM, dict(d_model=4, n_keys=5, n_heads=1, knn=1)),
    (PKM, dict(d_model=6, n_keys=4, n_heads=3, knn=2, selection="dense")),
    (PKM, dict(d_model=4, n_keys=3, n_heads=2, knn=3, selection="auto")),
    (SwitchMoE, dict(d_model=3, n_experts=6, expert_size=5)),
    (SBaseMoE, dict(d_model=6, n_experts=5, expert_size=2, k=3)),
    (GShardMoE, dict(d_model=5, n_experts=1, expert_size=4)),
    (GShardMoE, dict(d_model=3, n_experts=9, expert_size=2)),
    (BaseLayer, dict(d_model=2, n_experts=3, expert_size=7)),
    (BaseLayer, dict(d_model=5, n_experts=3, expert_size=2, expert_norm=True)),
    (HashLayer, dict(d_model=6, n_experts=2, expert_size=1, vocab_size=3)),
    (TMoE, dict(d_model=4, n_experts=2, expert_size=5)),
    (SMoE, dict(d_model=6, n_experts=3, seq_len=10, routing="learned", prefix_fraction=0.3)),
    (TokenChoiceMoE, dict(d_model=3, n_experts=6, expert_size=2, k=3, activation="relu")),
    (
        TokenChoiceMoE,
        dict(
            d_model=5,
            n_experts=6,
            expert_size=2,
            k=1,
            n_shared_experts=2,
            shared_expert_size=3,
            shared_expert_gate=True,
            bias_update_rate=0.01,
        ),
    ),
    (CausalSGU, dict(d_ffn=4, seq_len=9)),
    (SwitchHead, dict(d_model=6, n_heads=3, n_experts=1, k=1)),
    (SwitchHead, dict(d_model=5, n_heads=2, n_experts=4, k=3, d_head=3, positions="xl")),
    (SwitchHead, dict(d_model=4, n_heads=1, n_experts=2, k=1, peri_norm=True)),
]


@pytest.mark.parametrize("cls, kw", SIZES, ids=[ids_of(c) for c, _ in SIZES])
def test_parameter_count(cls, kw, monkeypatch):
    layer = cls(**kw)
    cfg = layer.config

    def refuse(*args, **kwargs):
        raise AssertionError("parameter_count built the layer")

    monkeypatch.setattr(cls, "__init__", refuse)
    count = cfg.parameter_count()
    assert count.total == sum(p.numel() for p in layer.parameters())
    assert count.active == ACTIVE[cls](layer)
    assert count.active <= count.total


def _drops_in_training(layer, x) -> int:
    layer.train()(x)
    return layer.routing_stats.dropped


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: SwitchMoE(D, 4, 3, capacity_factor=0.25, **kw),
        lambda **kw: GShardMoE(D, 4, 3, capacity_factor=0.25, second_policy="all", **kw),
    ],
    ids=["SwitchMoE", "GShardMoE"],
)
def test_eval_without_capacity_is_causal(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(1, 12, D)
    assert _drops_in_training(layer, x) > 0
    layer.eval()
    y = layer(x)
    assert layer.routing_stats.dropped == 0
    for seed in range(5):
        x2 = x.clone()
        x2[:, -1] = torch.randn(D, generator=torch.Generator().manual_seed(seed)) * 3
        torch.testing.assert_close(layer(x2)[:, :-1], y[:, :-1])
    # with an eval capacity, eval drops as training does
    capped = make(eval_capacity_factor=0.1)
    capped.load_state_dict(layer.state_dict())
    capped.eval()(x)
    assert capped.routing_stats.dropped > 0


def test_gshard_eval_capacity_is_not_causal():
    """Token 0 prefers expert 0 then 1. With capacity 1, a token 1 whose top-1 is expert 1 pushes
    token 0's second assignment out (top-1 assignments queue first); one preferring expert 0
    does not."""
    layer = GShardMoE(2, 2, 4, second_policy="all", eval_capacity_factor=0.5).double().eval()
    with torch.no_grad():
        layer.router.gate.copy_(torch.eye(2))
        layer.experts.w1.abs_()
    x_a = torch.tensor([[[2.0, 1.0], [0.0, 2.0]]], dtype=torch.float64)
    x_b = torch.tensor([[[2.0, 1.0], [2.0, 0.0]]], dtype=torch.float64)
    y_a, y_b = layer(x_a), layer(x_b)
    assert not torch.allclose(y_a[0, 0], y_b[0, 0])
    uncapped = GShardMoE(2, 2, 4, second_policy="all").double().eval()
    uncapped.load_state_dict(layer.state_dict())
    torch.testing.assert_close(uncapped(x_a)[0, 0], uncapped(x_b)[0, 0])


def test_a_user_layer_follows_the_contract():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ScaledConfig(moe_layers.LayerConfig):
        positional = ("d_model", "scale")
        scale: float = 2.0

        def __post_init__(self):
            super().__post_init__()
            if not math.isfinite(self.scale):
                raise ValueError(f"scale must be finite, got {self.scale!r}")

    class Scaled(moe_layers.MoEModule):
        Config = ScaledConfig

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.weight = torch.nn.Parameter(torch.ones(self.config.d_model))

        def forward_tokens(self, x_TD, token_ids_T):
            if self.training:
                self.record_aux_loss("scale", self.weight.sum())
            return self.config.scale * x_TD * self.weight

    assert list(inspect.signature(Scaled).parameters) == ["d_model", "scale"]
    layer = Scaled(3, 0.5)
    assert layer.config == ScaledConfig(d_model=3, scale=0.5)
    assert type(layer.config.build()) is Scaled
    assert layer.config.parameter_count() == moe_layers.ParameterCount(total=3, active=3)
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(layer(x), 0.5 * x)
    assert "scale" in layer.aux_losses
    layer.eval()(x)
    assert layer.aux_losses == {}
    with pytest.raises(ValueError, match="d_model=3"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="scale"):
        Scaled(3, float("nan"))
