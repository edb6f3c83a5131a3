"""The contract every layer in moe_layers follows: configuration, forward, auxiliary losses, statistics.

Shapes: T tokens, D = d_model, E experts, G expert width, K slots per token.

Config objects
    Every layer class L has `L.Config`, a frozen keyword-only dataclass whose fields are exactly L's
    constructor arguments (same names, defaults and order; `inspect.signature(L)` is made from it).
    `L(*args, **kwargs)` binds its arguments to `L.Config` (the fields named in `Config.positional`
    may be given positionally), which validates every option in its `__post_init__`, and keeps it as
    `layer.config`; the layer builds its parameters from that. `cfg.build()` and
    `L.from_config(cfg)` give the same layer. `cfg.parameter_count()` counts the layer's
    parameters without building it.

Forward
    Every layer (a `MoEModule`) is called as `layer(x, *, token_ids=None)`, x [..., d_model] -> y of
    the same shape. `MoEModule.forward` checks x's last dimension and token_ids (shape x.shape[:-1],
    an integer dtype), clears the auxiliary losses and calls `forward_batch`, which by default
    flattens to tokens and calls `forward_tokens(x_TD, token_ids_T)`. Layers that do not route by
    token id ignore token_ids.

Auxiliary losses
    A layer records its auxiliary (regularisation) losses during each forward pass in training mode,
    already multiplied by their configured weights, with `self.record_aux_loss(name, value)`. In eval
    mode no auxiliary loss is recorded. `collect_aux_losses(model)` walks every submodule and returns
    `{name: sum over layers}` for the latest forward pass of each layer, so that a trainer adds
    `sum(collect_aux_losses(model).values())` to its LM loss without knowing the layer types
    (the σ-MoE paper sums its entropy regulariser over layers; so does fairseq with `--moe-loss-sum`).

Routing statistics
    A routed layer records a `RoutingStats` (detached, no gradient) on every forward pass, in training
    and eval, with `self.record_routing_stats(...)`. `collect_routing_stats(model)` returns them keyed by
    the qualified module name. Within `without_routing_stats()` nothing is recorded (decoding).

After the optimiser step
    `after_optimizer_step(model, group)` calls `layer.after_optimizer_step(group)` on every layer;
    a trainer calls it after each optimizer.step() on every data-parallel rank (`group`: the
    data-parallel process group). A layer whose state follows the training batches updates it
    there (TokenChoiceMoE's expert bias, from the load of the global batch); others do nothing.

Routed layers
    A `RoutedMoE` holds a `router` (a `Router`: x_TD, token_ids_T -> `Routing`) and `experts` (an
    `Experts`: the E two-layer MLPs); its forward is routing = router(x), record the routing's
    auxiliary losses and statistics, y = experts(x, routing.idx_TK, routing.gates_TK).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import moe_kernels
import torch
from torch import Tensor, nn
from torch.nn import functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
# gated activations: act(x @ w1) * (x @ w3), a third matrix per expert (SwiGLU: act = silu)
GATED_ACTIVATIONS = {"swiglu": F.silu}
IMPLS = ("fast", "reference")


def check_option(config: Any, names: Iterable[str], ok: Callable[[Any], bool], requirement: str):
    """Raises ValueError naming the first of `names` whose value on `config` fails `ok`."""
    for name in names:
        value = getattr(config, name)
        if not ok(value):
            raise ValueError(f"{name} must be {requirement}, got {value!r}")


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_sizes(config, *names: str) -> None:
    check_option(config, names, lambda v: is_int(v) and v > 0, "a positive int")


def check_probabilities(config, *names: str) -> None:
    """Dropout-like rates: in [0, 1)."""
    check_option(config, names, lambda v: is_finite(v) and 0 <= v < 1, "a number in [0, 1)")


def check_non_negative(config, *names: str) -> None:
    check_option(config, names, lambda v: is_finite(v) and v >= 0, "a finite number >= 0")


def check_positive_or_none(config, *names: str) -> None:
    check_option(config, names, lambda v: v is None or (is_finite(v) and v > 0), "None or > 0")


def check_bools(config, *names: str) -> None:
    check_option(config, names, lambda v: isinstance(v, bool), "True or False")


def check_choice(config, name: str, choices) -> None:
    value = getattr(config, name)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}"
        )


def check_at_most(config, name: str, limit: int, limit_name: str) -> None:
    value = getattr(config, name)
    if value > limit:
        raise ValueError(f"{name} must be at most {limit_name} ({limit}), got {value!r}")


def count_ids(ids: Tensor, n: int, keep: Tensor | None = None) -> Tensor:
    """[n] int64: how often each id in [0, n) occurs in `ids` (any shape), the entries where
    `keep` (same shape, bool) is False left out.

    A scatter_add into n slots rather than bincount, which reads the largest id back to the host
    to size its output (a synchronisation on CUDA, a graph break under torch.compile).
    """
    flat = ids.reshape(-1).long()
    ones = torch.ones_like(flat) if keep is None else keep.reshape(-1).long()
    return flat.new_zeros(n).scatter_add(0, flat, ones)


def check_id_range(
    ids: Tensor, upper: int, name: str, upper_name: str, asynchronous: bool | None = None
) -> None:
    """Every entry of the integer tensor `ids` in [0, upper).

    Eager: a ValueError naming `name`, `upper_name` and the values found, which reads two values
    back. Asynchronous: one torch._assert_async, which the host does not wait for: it fails on
    the device (a device-side assert on CUDA, a RuntimeError on the CPU) without a
    synchronisation or a graph break. asynchronous=None: eager for CPU tensors outside
    torch.compile (where the reads wait for nothing), asynchronous otherwise.
    """
    if ids.numel() == 0:
        return
    if asynchronous is None:
        asynchronous = ids.device.type != "cpu" or torch.compiler.is_compiling()
    if asynchronous:
        ok = ((ids >= 0) & (ids < upper)).all()
        torch._assert_async(ok, f"{name} must lie in [0, {upper_name}={upper})")
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= upper:
        raise ValueError(
            f"{name} must lie in [0, {upper_name}={upper}), got values in [{lo}, {hi}]"
        )


@dataclass(frozen=True)
class ParameterCount:
    """total: parameters of the layer (a tied one counted once); active: those one token's output
    uses (the router and the experts it selects, for a routed layer)."""

    total: int
    active: int


@dataclass(frozen=True, kw_only=True)
class ModuleConfig:
    """Base of every Config: the fields are the module's constructor arguments.

    positional: the fields that may be given positionally to the constructor, in order (they must
        come first among the fields). layer_class: the module class, set when the class is defined
        (on this class itself: a subclass of a layer's Config belongs to no layer until one takes it).
    """

    positional: ClassVar[tuple[str, ...]] = ()
    layer_class: ClassVar[type | None] = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def build(self) -> nn.Module:
        layer_class = type(self).__dict__.get("layer_class")
        if layer_class is None:
            raise TypeError(f"{type(self).__qualname__} is not the Config of a layer class")
        return layer_class(**self.to_dict())

    def parameter_count(self) -> ParameterCount:
        """Built on the meta device (no memory), every parameter counted as active; the layers here
        count analytically instead."""
        with torch.device("meta"):
            n = sum(p.numel() for p in self.build().parameters())
        return ParameterCount(total=n, active=n)

    @classmethod
    def signature(cls) -> inspect.Signature:
        params = [
            inspect.Parameter(
                f.name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD
                if f.name in cls.positional
                else inspect.Parameter.KEYWORD_ONLY,
                default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default,
                annotation=f.type,
            )
            for f in dataclasses.fields(cls)
        ]
        return inspect.Signature(params)

    @classmethod
    def from_args(cls, *args, **kwargs) -> ModuleConfig:
        """The config of a constructor call `L(*args, **kwargs)` (TypeError as Python gives it)."""
        try:
            arguments = cls.signature().bind(*args, **kwargs).arguments
        except TypeError as err:
            raise TypeError(f"{cls.__qualname__.removesuffix('.Config')}(): {err}") from None
        return cls(**arguments)


@dataclass(frozen=True, kw_only=True)
class LayerConfig(ModuleConfig):
    """Base of the Config of every layer following the contract: a layer of width d_model."""

    positional: ClassVar[tuple[str, ...]] = ("d_model",)
    d_model: int

    def __post_init__(self) -> None:
        check_sizes(self, "d_model")


class _ConfigSignature:
    """`inspect.signature(L)` is L.Config's fields; an instance keeps the signature of its call."""

    def __get__(self, obj, cls):
        if obj is not None or cls.Config is None:
            raise AttributeError("__signature__")
        return cls.Config.signature()


class ConfiguredModule(nn.Module):
    """A module whose constructor arguments are the fields of its `Config` (see the module doc).

    A subclass defines `Config` (a frozen kw_only dataclass, subclass of ModuleConfig) and builds
    itself from `self.config` after `super().__init__(*args, **kwargs)`.
    """

    Config: ClassVar[type[ModuleConfig] | None] = None
    __signature__ = _ConfigSignature()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        config = cls.__dict__.get("Config")
        if config is None:
            return
        owner = config.__dict__.get("layer_class")
        if owner is not None:
            raise TypeError(f"{cls.__name__}.Config is already the Config of {owner.__name__}")
        try:
            config.signature()
        except ValueError as err:
            raise TypeError(
                f"{cls.__name__}.Config's fields make no signature ({err}): the positional fields "
                f"{config.positional} must come first, those without a default before the others"
            ) from None
        config.layer_class = cls

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        if self.Config is None:
            if args or kwargs:
                raise TypeError(f"{type(self).__name__} has no Config to take arguments")
            self.config = None
        else:
            self.config = self.Config.from_args(*args, **kwargs)

    @classmethod
    def from_config(cls, config: ModuleConfig):
        if cls.Config is None or not isinstance(config, cls.Config):
            raise TypeError(f"{cls.__name__}.from_config needs a {cls.__name__}.Config")
        return cls(**config.to_dict())


@dataclass(frozen=True)
class RoutingStats:
    """What a routed layer did with the tokens of one forward pass.

    expert_counts: [E] assignments (token, slot) each expert was selected for, before any dropping.
    n_tokens: tokens routed.
    dropped_count, entropy_nats: 0-dim tensors; read them as `dropped` (int: assignments removed by
        a capacity limit, 0 for layers without one) and `entropy` (float: nats of the
        batch-averaged selection distribution over experts).
    expert_bias: [E], the balancing bias the choice used (a copy), for layers that have one.

    Everything stays on the layer's device, so that recording the statistics never makes the host
    wait for the GPU; reading `dropped` or `entropy` does.
    """

    expert_counts: Tensor
    n_tokens: int
    dropped_count: Tensor
    entropy_nats: Tensor
    expert_bias: Tensor | None = None

    @property
    def dropped(self) -> int:
        return int(self.dropped_count)

    @property
    def entropy(self) -> float:
        return float(self.entropy_nats)

    @property
    def usage(self) -> Tensor:
        """Share of assignments per expert, [E], summing to 1 (all zeros when no token was routed)."""
        total = self.expert_counts.sum()
        return self.expert_counts.float() / total.clamp(min=1)


class MoEModule(ConfiguredModule):
    """Base of every layer here: the forward contract, and the latest forward pass's auxiliary
    losses and routing statistics.

    A layer's Config subclasses LayerConfig (so it has d_model). A layer implements
    `forward_tokens(x_TD, token_ids_T) -> y_TD` or, if it needs the batch's shape (SMoE mixes
    along the sequence), `forward_batch(x, token_ids)`.
    """

    Config: ClassVar[type[LayerConfig] | None] = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._aux_losses: dict[str, Tensor] = {}
        self._routing_stats: RoutingStats | None = None

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Tensor:
        d_model = self.config.d_model
        if x.dim() == 0 or x.shape[-1] != d_model:
            raise ValueError(
                f"x must have last dimension d_model={d_model}, got shape {tuple(x.shape)}"
            )
        if token_ids is not None:
            if token_ids.shape != x.shape[:-1]:
                raise ValueError(
                    f"token_ids must have shape x.shape[:-1]={tuple(x.shape[:-1])}, "
                    f"got {tuple(token_ids.shape)}"
                )
            if not is_integer_dtype(token_ids.dtype):
                raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
        if self._aux_losses:
            # a new dict, never cleared in place: a caller may hold the last one (nn.Module's
            # __setattr__ costs more than this test, so an empty one stays)
            self._aux_losses = {}
        return self.forward_batch(x, token_ids)

    def forward_batch(self, x: Tensor, token_ids: Tensor | None) -> Tensor:
        """x [..., D] -> [..., D]; by default each token on its own, through forward_tokens."""
        ids_T = None if token_ids is None else token_ids.reshape(-1)
        return self.forward_tokens(x.reshape(-1, x.shape[-1]), ids_T).reshape(x.shape)

    def forward_tokens(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} implements no forward_tokens")

    def record_aux_loss(self, name: str, value: Tensor) -> None:
        self._aux_losses[name] = value

    def record_routing_stats(
        self,
        expert_counts: Tensor,
        n_tokens: int,
        probs_TE: Tensor | None = None,
        dropped: int | Tensor = 0,
    ) -> None:
        """probs_TE: each token's selection distribution over experts; its batch mean gives the entropy.

        Without it, the entropy is that of the assignment counts. `dropped` may be a tensor, so
        that a layer need not read it back from the GPU.
        """
        if not records_routing_stats():
            if self._routing_stats is not None:
                self._routing_stats = None
            return
        with torch.no_grad():
            if probs_TE is not None and probs_TE.shape[0] > 0:
                p = probs_TE.float().mean(0)
            else:
                p = expert_counts.float() / expert_counts.sum().clamp(min=1)
            entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
        self._routing_stats = RoutingStats(
            expert_counts=expert_counts.detach(),
            # not int(): under torch.compile that would specialise the graph to this token count
            n_tokens=n_tokens,
            dropped_count=torch.as_tensor(dropped, device=expert_counts.device).detach(),
            entropy_nats=entropy,
        )

    def after_optimizer_step(self, group=None) -> None:
        """Called after every optimiser step (see `after_optimizer_step`): a layer with state that
        follows the training batches (TokenChoiceMoE's expert bias) updates it here. `group`:
        the data-parallel process group (None: the default group). Nothing by default."""

    @property
    def aux_losses(self) -> dict[str, Tensor]:
        return dict(self._aux_losses)

    @property
    def routing_stats(self) -> RoutingStats | None:
        return self._routing_stats


_RECORD_ROUTING_STATS = [True]


@contextlib.contextmanager
def without_routing_stats():
    """Routed layers record no RoutingStats inside (collect_routing_stats then returns {}). For
    decoding: nobody reads them there, and at one token per step their small ops (a softmax, a
    mean, a log per layer) cost a noticeable part of a step."""
    previous = _RECORD_ROUTING_STATS[0]
    _RECORD_ROUTING_STATS[0] = False
    try:
        yield
    finally:
        _RECORD_ROUTING_STATS[0] = previous


def records_routing_stats() -> bool:
    """False inside `without_routing_stats()`: a router may then skip what only the statistics use."""
    return _RECORD_ROUTING_STATS[0]


def collect_layer_outputs(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, RoutingStats]]:
    """(collect_aux_losses(module), collect_routing_stats(module)) in one walk over the modules:
    a model reads both after every forward, and at one token per step a walk costs as much as a
    layer's products."""
    aux: dict[str, Tensor] = {}
    stats: dict[str, RoutingStats] = {}
    for name, m in module.named_modules():
        if isinstance(m, MoEModule):
            for loss, value in m._aux_losses.items():
                aux[loss] = aux[loss] + value if loss in aux else value
            if m._routing_stats is not None:
                stats[name] = m._routing_stats
    return aux, stats


def collect_aux_losses(module: nn.Module) -> dict[str, Tensor]:
    """Weighted auxiliary losses of the latest forward pass of every layer in `module`, summed per name."""
    return collect_layer_outputs(module)[0]


def collect_routing_stats(module: nn.Module) -> dict[str, RoutingStats]:
    """Latest routing statistics of every routed layer in `module`, keyed by qualified module name."""
    return collect_layer_outputs(module)[1]


def after_optimizer_step(module: nn.Module, group=None) -> None:
    """Calls `after_optimizer_step(group)` on every layer in `module`, in module order. A trainer
    calls it after each optimizer.step(), on every data-parallel rank (a layer may all-reduce over
    `group`, the data-parallel group; None: the default group)."""
    for m in module.modules():
        if isinstance(m, MoEModule):
            m.after_optimizer_step(group)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's where it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@dataclass(frozen=True)
class Routing:
    """What a router decided for T tokens.

    idx_TK: the K experts of each token; gates_TK: their weights (0 for a slot dropped by a
    capacity limit); counts_E: assignments per expert before dropping (read by the routing
    statistics alone: a router may leave it None inside `without_routing_stats()`); dropped:
    assignments dropped (int or 0-dim tensor); probs_TE: each token's selection distribution over
    the experts, for the routing entropy (None: the entropy of counts_E); aux_losses: {name:
    weighted loss}.
    """

    idx_TK: Tensor
    gates_TK: Tensor
    counts_E: Tensor | None
    dropped: Tensor | int = 0
    probs_TE: Tensor | None = None
    aux_losses: dict[str, Tensor] = dataclasses.field(default_factory=dict)


class Router(nn.Module):
    """Chooses the experts of each token: `router(x_TD, token_ids_T) -> Routing`."""

    def __init__(self, n_experts: int) -> None:
        super().__init__()
        self.n_experts = n_experts

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        raise NotImplementedError(f"{type(self).__name__} implements no forward")


class LinearRouter(Router):
    """A router scoring the experts by x @ gate.T, gate [E, D] (initialised by the layer)."""

    def __init__(self, d_model: int, n_experts: int) -> None:
        super().__init__(n_experts)
        self.gate = nn.Parameter(torch.empty(n_experts, d_model))

    def logits(self, x_TD: Tensor) -> Tensor:
        return x_TD @ self.gate.t()


def reference_expert_mlp(
    x_TD,
    w1_EDG,
    w2_EGD,
    idx_TK,
    gates_TK,
    activation: str,
    hidden_dropout: float = 0.0,
    w3_EDG: Tensor | None = None,
    b1_EG: Tensor | None = None,
    b2_ED: Tensor | None = None,
) -> Tensor:
    """Readable reference of the expert computation: a loop over experts. It reads the device
    (nonzero per expert), as the references may; the fast path (moe_kernels) does not.

    y[t] = sum_k gates[t, k] * dropout(act(x[t] @ w1[idx[t, k]])) @ w2[idx[t, k]]; a gated
    activation (GATED_ACTIVATIONS, with w3) uses act(x[t] @ w1[e]) * (x[t] @ w3[e]) instead.
    With biases: act(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e], inside the gate.
    `hidden_dropout` > 0 applies (training-mode) dropout to the expert hidden activations.
    """
    gated = activation in GATED_ACTIVATIONS
    act = GATED_ACTIVATIONS[activation] if gated else ACTIVATIONS[activation]
    y_TD = torch.zeros_like(x_TD)
    for e in range(w1_EDG.shape[0]):
        # an expert without tokens still joins the graph, so that y has a gradient path (zeros)
        tok, slot = torch.nonzero(idx_TK == e, as_tuple=True)
        a = x_TD[tok] @ w1_EDG[e]
        u = act(a if b1_EG is None else a + b1_EG[e])
        if gated:
            u = u * (x_TD[tok] @ w3_EDG[e])
        if hidden_dropout > 0:
            u = F.dropout(u, hidden_dropout)
        h = u @ w2_EGD[e]
        if b2_ED is not None:
            h = h + b2_ED[e]
        y_TD = y_TD.index_add(0, tok, h * gates_TK[tok, slot].unsqueeze(-1).to(h.dtype))
    return y_TD


class Experts(nn.Module):
    """E two-layer MLPs `act(x @ w1[e]) @ w2[e]`: `experts(x_TD, idx_TK, gates_TK) -> y_TD`,
    y[t] = sum_k gates[t, k] * expert_{idx[t, k]}(x[t]); with a gated activation ("swiglu")
    `(silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]`.

    impl: "fast" runs moe_kernels.expert_mlp, "reference" the loop over experts above.
    hidden_dropout: dropout on the expert hidden activations in training (the σ-MoE code's
        `dropout`); the fast path then runs the two expert matmuls separately, since expert_mlp
        fuses them.
    bias: False, or True for biases b1 [E, G] and b2 [E, D]: act(x @ w1[e] + b1[e]) @ w2[e] +
        b2[e] (fairseq's BASE experts; not with a gated activation); the fast path then runs the
        two expert matmuls separately too.
    The arguments come from a layer's validated Config; parameters are left uninitialised for the
    layer to initialise. Parameters: w1 [E, D, G], w2 [E, G, D] (and w3 [E, D, G], gated; b1, b2
    with bias).
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        expert_size: int,
        *,
        activation: str = "relu",
        hidden_dropout: float = 0.0,
        impl: str = "fast",
        bias: bool = False,
    ) -> None:
        super().__init__()
        if bias and activation in GATED_ACTIVATIONS:
            raise ValueError(f"expert biases are not defined for the gated {activation!r}")
        self.d_model, self.n_experts, self.expert_size = d_model, n_experts, expert_size
        self.activation, self.hidden_dropout, self.impl = activation, hidden_dropout, impl
        self.bias = bias
        shapes = self.weight_shapes(d_model, n_experts, expert_size, activation, bias)
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))

    @staticmethod
    def weight_shapes(
        d_model: int, n_experts: int, expert_size: int, activation: str, bias: bool = False
    ) -> dict[str, tuple[int, ...]]:
        """The expert weights by name: w1 [E, D, G], w2 [E, G, D], w3 [E, D, G] for a gated
        activation (GATED_ACTIVATIONS), b1 [E, G] and b2 [E, D] with biases.

        The one place that says which matrices an expert has: `Experts` creates them and
        `ExpertsConfig.parameter_count` counts them from it.
        """
        shapes = {"w1": (n_experts, d_model, expert_size), "w2": (n_experts, expert_size, d_model)}
        if activation in GATED_ACTIVATIONS:
            shapes["w3"] = (n_experts, d_model, expert_size)
        if bias:
            shapes["b1"] = (n_experts, expert_size)
            shapes["b2"] = (n_experts, d_model)
        return shapes

    def forward(self, x_TD: Tensor, idx_TK: Tensor, gates_TK: Tensor) -> Tensor:
        return self.mlp(x_TD, idx_TK, gates_TK, dict(self._parameters))

    def mlp(
        self, x_TD: Tensor, idx_TK: Tensor, gates_TK: Tensor, weights: dict[str, Tensor]
    ) -> Tensor:
        """The experts of `weights` (w1, w2 and the others of `weight_shapes`: this module's, or
        an expert-parallel shard of them, whose idx_TK index the shard) on x_TD."""
        p = self.hidden_dropout if self.training else 0.0
        # autocast does not reach inside the expert kernels: cast to its dtype here, so that under
        # bf16/fp16 autocast the experts run in low precision like any matmul of the model
        dtype = compute_dtype(x_TD)
        x_TD, gates_TK = x_TD.to(dtype), gates_TK.to(dtype)
        w1_EDG, w2_EGD = weights["w1"].to(dtype), weights["w2"].to(dtype)
        gated = self.activation in GATED_ACTIVATIONS
        w3_EDG = weights["w3"].to(dtype) if gated else None
        b1_EG, b2_ED = (
            (weights["b1"].to(dtype), weights["b2"].to(dtype)) if self.bias else (None, None)
        )
        if self.impl == "reference":
            return reference_expert_mlp(
                x_TD, w1_EDG, w2_EGD, idx_TK, gates_TK, self.activation, p, w3_EDG, b1_EG, b2_ED
            )
        if self.bias:
            a_TKG = moe_kernels.expert_matmul(x_TD, w1_EDG, idx_TK) + b1_EG[idx_TK]
            u_TKG = F.dropout(ACTIVATIONS[self.activation](a_TKG), p)
            y_TD = moe_kernels.expert_matmul(u_TKG, w2_EGD, idx_TK, gates_TK)
            return y_TD + (gates_TK[..., None] * b2_ED[idx_TK]).sum(1)
        if p > 0:
            if gated:
                a_TKG = moe_kernels.expert_matmul(x_TD, w1_EDG, idx_TK)
                u_TKG = GATED_ACTIVATIONS[self.activation](a_TKG)
                u_TKG = u_TKG * moe_kernels.expert_matmul(x_TD, w3_EDG, idx_TK)
            else:
                a_TKG = moe_kernels.expert_matmul(x_TD, w1_EDG, idx_TK)
                u_TKG = ACTIVATIONS[self.activation](a_TKG)
            return moe_kernels.expert_matmul(F.dropout(u_TKG, p), w2_EGD, idx_TK, gates_TK)
        return moe_kernels.expert_mlp(
            x_TD, w1_EDG, w2_EGD, idx_TK, gates_TK, self.activation, w3=w3_EDG
        )


def routed_parameter_count(
    d_model: int,
    n_experts: int,
    expert_size: int,
    slots: int,
    gate: bool = True,
    activation: str = "relu",
    bias: bool = False,
) -> ParameterCount:
    """A routed layer's count: a gate [E, D] (if any) and E experts, `slots` of them per token."""
    router = n_experts * d_model if gate else 0
    shapes = Experts.weight_shapes(d_model, n_experts, expert_size, activation, bias)
    expert = sum(math.prod(shape[1:]) for shape in shapes.values())
    return ParameterCount(total=router + n_experts * expert, active=router + slots * expert)


@dataclass(frozen=True, kw_only=True)
class ExpertSizes(LayerConfig):
    """n_experts (E) experts of width expert_size (G): the first fields of a routed layer's Config,
    positional after d_model. See ExpertsConfig."""

    positional: ClassVar[tuple[str, ...]] = ("d_model", "n_experts", "expert_size")
    n_experts: int
    expert_size: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sizes(self, "n_experts", "expert_size")

    @property
    def slots(self) -> int:
        """Experts each token uses, for the active parameter count (1 unless a layer says so)."""
        return 1


@dataclass(frozen=True, kw_only=True)
class TopK(ExpertSizes):
    """ExpertSizes and k, the experts per token (positional after expert_size; 1 <= k <= E)."""

    positional: ClassVar[tuple[str, ...]] = ("d_model", "n_experts", "expert_size", "k")
    k: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sizes(self, "k")
        check_at_most(self, "k", self.n_experts, "n_experts")

    @property
    def slots(self) -> int:
        return self.k


@dataclass(frozen=True, kw_only=True)
class ExpertsConfig(ExpertSizes):
    """One description of the experts of a routed layer: every RoutedMoE's Config derives from it,
    so that an expert option is declared, defaulted, validated and counted here once.

    n_experts, expert_size: E experts of width G (ExpertSizes).
    activation: the experts' nonlinearity (one of ACTIVATIONS).
    dropout: dropout on the expert hidden activations in training (0: off).
    n_layers: the depth of the network, for the layers' init scale c = sqrt(2 / n_layers).
    impl: "fast" (moe_kernels.expert_mlp) or "reference" (a loop over experts).

    A layer whose tokens use k experts writes `class Config(ExpertsConfig, TopK)` (in that order,
    so that the fields are d_model, n_experts, expert_size, k, then the options); one with a fixed
    number of experts per token overrides `slots`. The layer's own router options follow. The
    count is that of the experts' weights (`Experts.weight_shapes`) and, unless `router_gate` is
    False, a gate [E, D]. `activations`: the names `activation` may take (a layer whose experts
    support more, e.g. a gated one, widens it and redeclares `activation` for its default).
    """

    router_gate: ClassVar[bool] = True
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    activation: str = "relu"
    dropout: float = 0.0
    n_layers: int = 1
    impl: str = "fast"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sizes(self, "n_layers")
        check_probabilities(self, "dropout")
        check_choice(self, "activation", self.activations)
        check_choice(self, "impl", IMPLS)

    def parameter_count(self) -> ParameterCount:
        return routed_parameter_count(
            self.d_model,
            self.n_experts,
            self.expert_size,
            self.slots,
            gate=self.router_gate,
            activation=self.activation,
            bias=self.biased_experts,
        )

    @property
    def biased_experts(self) -> bool:
        """Whether the experts have biases (Experts' `bias`): False unless a layer has the option."""
        return False


@dataclass(frozen=True, kw_only=True)
class CapacityOptions(ExpertsConfig):
    """The Config of a layer with a capacity-limited, loss-balanced router (SwitchMoE, GShardMoE):
    the experts and the router options they share, each layer saying how it applies them.

    capacity_factor: in training, None (no capacity limit) or a positive float f scaling the
        layer's per-expert capacity. eval_capacity_factor: in eval mode, None (default: no
        limit) or a positive float f (ceil(f * T) per expert). load_balance_weight: the weight
        of the layer's balancing loss (>= 0).
    """

    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    load_balance_weight: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_or_none(self, "capacity_factor", "eval_capacity_factor")
        check_non_negative(self, "load_balance_weight")

    def capacity_options(self) -> dict:
        """The router's arguments of the same names."""
        return dict(
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
            load_balance_weight=self.load_balance_weight,
        )


class RoutedMoE(MoEModule):
    """Base of the layers that route each token to K of E expert MLPs.

    Its Config derives from ExpertsConfig. `__init__` builds `self.experts` (`build_experts`:
    from the Config's d_model, n_experts, expert_size, activation, dropout and impl), then
    `self.router` (`build_router`), then calls `reset_parameters`. forward: routing =
    router(x_TD, token_ids_T), then `apply_routing`: its auxiliary losses and statistics are
    recorded; y = experts(expert_inputs(x_TD, routing), routing.idx_TK, routing.gates_TK), where
    `expert_inputs` is x_TD unless a layer transforms what its experts see (BaseLayer's
    per-expert LayerNorm). A layer whose router needs more than the tokens (SBaseMoE's, the
    sequences) calls it in its own `forward_batch` and then `apply_routing`. `shard_experts`
    (moe_layers.parallel) shards `experts` over an expert mesh.
    """

    Config: ClassVar[type[ExpertsConfig] | None] = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.experts = self.build_experts()
        self.router = self.build_router()
        self.reset_parameters()

    def build_experts(self) -> Experts:
        c = self.config
        return Experts(
            c.d_model,
            c.n_experts,
            c.expert_size,
            activation=c.activation,
            hidden_dropout=c.dropout,
            impl=c.impl,
            bias=c.biased_experts,
        )

    def build_router(self) -> Router:
        raise NotImplementedError(f"{type(self).__name__} implements no build_router")

    def reset_parameters(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} implements no reset_parameters")

    def forward_tokens(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Tensor:
        return self.apply_routing(x_TD, self.router(x_TD, token_ids_T))

    def apply_routing(self, x_TD: Tensor, routing: Routing) -> Tensor:
        """Records the routing's auxiliary losses and statistics; runs the experts on x_TD."""
        for name, loss in routing.aux_losses.items():
            self.record_aux_loss(name, loss)
        self.record_routing_stats(
            routing.counts_E, x_TD.shape[0], routing.probs_TE, routing.dropped
        )
        return self.experts(self.expert_inputs(x_TD, routing), routing.idx_TK, routing.gates_TK)

    def expert_inputs(self, x_TD: Tensor, routing: Routing) -> Tensor:
        """What the experts are given for the tokens the router saw (x_TD itself by default)."""
        return x_TD
