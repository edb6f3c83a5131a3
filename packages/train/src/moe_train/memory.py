"""Memory plan: what one rank holds while training, part by part, worked out from the configs
before anything is built; the preflight refuses a run that cannot fit its device.

Layout (moe_train.parallelize, after torchtitan's "dp2ep"): world size = dp_replicate x
dp_shard. FSDP2 shards every parameter on dim 0 over the dp_shard ranks, a rank holding
ceil(rows / degree) rows (rank 0's share, the largest). The routed experts (`moe_layers.Experts`)
are first cut into ep slices of whole experts (Shard(0) over an expert mesh of ep ranks
borrowed from the dp_shard ranks), each slice sharded over the other dp_shard / ep ranks: their
degree is ep x dp_shard / ep. dp_replicate copies everything; it shards nothing. One process
runs the plain model (no FSDP2). Per rank, in bytes, with P_r the parameters the rank holds:

    parameters  = 4 P_r     the fp32 (master) weights
    gradients   = 4 P_r     fp32 gradients, reduce-scattered to the shards
    optimizer   = 8 P_r     AdamW's two moments
    gathered    = p (R + n U) + (p + r) U_max     FSDP2's unsharded copies for compute

gathered (more than one process) counts what FSDP2 all-gathers in param_dtype (p bytes): the
root's parameters R (embedding, final norm, head: the root is not resharded between forward and
backward) and, per block, U_l = its parameters with the experts at 1/ep (they are gathered over
the dp_shard / ep ranks of their slice only). n U = max_l (U_l + U_l+1) with
reshard_after_forward (the block computing and the next one, prefetched), sum_l U_l without it
(every block stays gathered until its backward). In backward one block's unsharded gradients
exist in param_dtype and, when reduce_dtype differs (r bytes, else r = 0), in reduce_dtype.

    activations = N (b (body + 3d) + 12 V)

N = micro-batch x seq_len tokens per rank, b = 2 bytes under bf16/fp16 (train.precision, or
train.param_dtype under FSDP2), else 4; 3d: the embedding dropout mask, the final LayerNorm's
input and the head's input; 12 V (V = vocab_size): the fp32 logits, log-softmax and its
gradient. Per token, in elements, layer l holds A_l for backward, keeps S_l under selective
checkpointing (the outputs of aten mm / bmm / addmm, moe_train.parallelize.SAVED_OPS), K_l
under full checkpointing (its inputs), and its backward needs a workspace G_l. With d = d_model,
i = heads x d_head, r = 1 with dropout (0 without), F = smlp_d_ff, and per FFN (the layer's FFN
and standalone block) w = its active hidden width, estimated as active parameters / 2d:

    decoder, Transformer-XL   A = 4d + 5i + 2rd + sum (2w | 0)
                              S = 2d + 3i + sum (w + d | E)      K = d
                              G = sum (2w | 6w + 3kd)
        (A: the block input, the two LayerNorms' inputs and outputs, q, k, v, the attention
        output and its copy into the out-projection, the dropout masks, a dense FFN's hidden
        layer before and after its activation; attention runs fused, without L x L scores; a
        routed FFN (k experts a token, k d = w d / expert_size) saves no hidden rows. S: the
        block input, the q, k, v and out-projection matmuls, a dense FFN's two matmuls; a routed
        FFN keeps only its router's E logits. G: a dense FFN's backward holds the gradients of
        its hidden layer, 2w; moe_kernels' expert backward gathers the tokens and their output
        gradients again, recomputes the hidden rows and their activation and holds their
        gradients before and after the gates and the activation, 6w + 3kd; the torch backend
        runs it in chunks of tokens, which the plan does not count on)
    Transformer-XL, memory M, context c = L + M, adds
                              A: (M / L)(2d + 2i) + hc    S: (M / L) 2i + hc   K: (M / L) d
        (the memory, its LayerNorm, keys and values; the attention bias, materialised per head:
        the relative shift keeps no copy of the positional scores; S keeps those scores, the
        output of a bmm, instead)
    sMLP gMLP block           A = 2d + 3.5F + rd    S = 2d + 1.5F    K = d    G = 2F
    sMLP sparse block         A = 6d + 2rd          S = 3d + E       K = d    G = 6w + 3kd

Under EP (ep > 1) a routed FFN also holds the tokens it received, k d = w d / expert_size, in A.
The body by train.activation_checkpointing:

    none:       sum_l A_l + max_l G_l
    full:       sum_l K_l + max_l (A_l + G_l)          (one block recomputed at a time)
    selective:  sum_l S_l + max_l (A_l - S_l + G_l)

The layer terms follow Korthikanti et al. 2022 ("Reducing activation recomputation in large
transformer models") adapted to fused attention and routed FFNs. Left out: allocator
fragmentation, optimiser temporaries, communication buffers, the CUDA context and the
framework.

build (moe_train.build): one process builds the whole fp32 model on the host, then moves it to
its device. Past one process no rank's device holds the whole model: every rank allocates its
fp32 shards (4 P_r) and receives the weights one whole tensor at a time (T_max, the largest),
build = 4 P_r + 4 T_max, less than the total in any plan worth running; the peak is the larger.
The whole fp32 model, host = 4 P bytes, is built once, in the host memory of rank 0 (or of the
one process); past one process a resumed run reads its checkpoint into the shards instead (and
builds the real model only for buffers outside the state dict, which no preset has).

What is available: the free memory of the GPU (`torch.cuda.mem_get_info`) on CUDA; on the CPU,
MemAvailable from /proc/meminfo (elsewhere free physical pages from os.sysconf). The host check
is rank 0's, for a fresh run past one process and for every run of one process: on CUDA, host <=
MemAvailable; past one process on the CPU, host + peak <= MemAvailable (its shards live in the
same memory). The other ranks of a node share its host and check their device alone.
`train.skip_memory_check=true` turns the checks off.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import moe_models
import torch
from moe_layers import Experts

from moe_train.errors import CLIError

GIB = 2**30
DTYPES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class Layout:
    """How the ranks split the model (moe_train.parallelize.Layout) and the train.* keys that
    change what a rank holds."""

    world_size: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1
    param_dtype: str = "fp32"
    reduce_dtype: str = "fp32"
    reshard_after_forward: bool = True
    activation_checkpointing: str = "none"

    @classmethod
    def from_train(cls, train_cfg, world_size: int = 1) -> Layout:
        """The layout train_cfg asks for on world_size ranks (a one-line CLIError when its
        numbers do not fit the world size: moe_train.parallelize.resolve_layout)."""
        from moe_train.parallelize import resolve_layout

        mesh = resolve_layout(train_cfg, world_size)
        return cls(
            world_size=world_size,
            dp_replicate=mesh.dp_replicate,
            dp_shard=mesh.dp_shard,
            ep=mesh.ep,
            param_dtype=train_cfg.param_dtype,
            reduce_dtype=train_cfg.reduce_dtype,
            reshard_after_forward=train_cfg.reshard_after_forward,
            activation_checkpointing=train_cfg.activation_checkpointing,
        )

    @property
    def fsdp(self) -> bool:
        """Whether FSDP2 runs (on every layout of more than one process) and gathers copies."""
        return self.world_size > 1


@dataclass(frozen=True)
class Tensor:
    """A parameter's shape summary: numel and rows (its dim 0); experts: how many, or 0."""

    numel: int
    rows: int
    experts: int = 0

    def held(self, degree: int) -> int:
        """Elements on the rank with the largest dim-0 shard."""
        return -(-self.rows // degree) * (self.numel // self.rows)


@dataclass(frozen=True)
class Inventory:
    """The model's parameters: root (outside the blocks) and one list per block."""

    root: tuple[Tensor, ...]
    blocks: tuple[tuple[Tensor, ...], ...]

    @property
    def total(self) -> int:
        return sum(t.numel for t in self.root) + sum(t.numel for b in self.blocks for t in b)


def inventory(model_cfg) -> Inventory:
    """Every parameter's shape, from the model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = moe_models.build(model_cfg)
    experts = {
        id(p): m.n_experts
        for m in model.modules()
        if isinstance(m, Experts)
        for p in m.parameters(recurse=False)
    }

    def tensors(module, exclude=()) -> tuple[Tensor, ...]:
        return tuple(
            Tensor(p.numel(), p.shape[0] if p.dim() else 1, experts.get(id(p), 0))
            for p in module.parameters()
            if id(p) not in exclude
        )

    blocks = tuple(tensors(layer) for layer in model.layers)
    in_blocks = {id(p) for p in model.layers.parameters()}
    return Inventory(root=tensors(model, in_blocks), blocks=blocks)


@dataclass(frozen=True)
class Plan:
    """Bytes one rank holds, by part; `held` the parameters in its shards."""

    layout: Layout
    micro_batch: int
    parameters_total: int
    largest: int
    held: int
    parameters: int
    gradients: int
    optimizer: int
    gathered: int
    activations: int

    @property
    def states(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.states + self.gathered + self.activations

    @property
    def build(self) -> int:
        """What the device holds while the model is built: its fp32 shards and, past one
        process, the largest whole tensor on its way to them."""
        return self.parameters + (4 * self.largest if self.layout.fsdp else 0)

    @property
    def peak(self) -> int:
        return max(self.total, self.build)

    @property
    def host(self) -> int:
        """The whole fp32 model, which rank 0 (or the one process) builds on the host."""
        return 4 * self.parameters_total


def plan(model_cfg, train_cfg, micro_batch: int, layout: Layout | None = None) -> Plan:
    """The per-rank memory of training model_cfg at micro_batch sequences per rank."""
    layout = layout or Layout.from_train(train_cfg, 1)
    inv = inventory(model_cfg)
    _check_experts(inv, layout.ep)

    def held(t: Tensor) -> int:
        if t.experts:
            sliced = Tensor(t.numel // layout.ep, t.rows // layout.ep, t.experts)
            return sliced.held(layout.dp_shard // layout.ep)
        return t.held(layout.dp_shard)

    held_params = sum(held(t) for t in inv.root) + sum(held(t) for b in inv.blocks for t in b)
    return Plan(
        layout=layout,
        micro_batch=micro_batch,
        parameters_total=inv.total,
        largest=max(t.numel for t in (*inv.root, *(t for b in inv.blocks for t in b))),
        held=held_params,
        parameters=4 * held_params,
        gradients=4 * held_params,
        optimizer=8 * held_params,
        gathered=_gathered(inv, layout),
        activations=activations(model_cfg, train_cfg, micro_batch, layout),
    )


def _check_experts(inv: Inventory, ep: int) -> None:
    for i, block in enumerate(inv.blocks):
        for t in block:
            if t.experts % ep:
                raise CLIError(
                    f"train.ep={ep} must divide the number of experts ({t.experts} in layer {i})"
                )


def _gathered(inv: Inventory, layout: Layout) -> int:
    if not layout.fsdp:
        return 0
    p = DTYPES[layout.param_dtype]
    r = DTYPES[layout.reduce_dtype] if layout.reduce_dtype != layout.param_dtype else 0
    root = sum(t.numel for t in inv.root)
    unsharded = [sum(t.numel // layout.ep if t.experts else t.numel for t in b) for b in inv.blocks]
    largest = max(unsharded, default=0)
    if layout.reshard_after_forward:
        pairs = [a + b for a, b in zip(unsharded, unsharded[1:], strict=False)]
        blocks = max(pairs, default=largest)
    else:
        blocks = sum(unsharded)
    return p * (root + blocks) + (p + r) * largest


def activation_bytes(train_cfg, layout: Layout) -> int:
    low = train_cfg.precision in ("bf16", "fp16") or (layout.fsdp and layout.param_dtype != "fp32")
    return 2 if low else 4


def _width(ffn_cfg, d: int) -> float:
    return ffn_cfg.parameter_count().active / (2 * d)


def _routed(ffn_cfg) -> bool:
    return getattr(ffn_cfg, "n_experts", 0) > 0 and getattr(ffn_cfg, "expert_size", 0) > 0


def _layer_terms(model_cfg, i: int, ep: int) -> tuple[float, float, float, float]:
    """(A, S, K, G) of layer i per token, in elements: what it holds for backward, the part of
    it that selective checkpointing keeps, what full checkpointing keeps, and the workspace of
    its backward."""
    c = model_cfg
    d, r = c.d_model, 1 if c.dropout > 0 else 0
    if c.arch == "smlp" and not c.is_moe_layer(i):
        F = c.smlp_d_ff
        return 2 * d + 3.5 * F + r * d, 2 * d + 1.5 * F, d, 2 * F
    ffns = [f for f in (c.layer_ffn_config(i), c.standalone_config(i)) if f is not None]
    if c.arch == "smlp":
        ffns = ffns[:1]
    A = S = G = 0.0
    for f in ffns:
        w = _width(f, d)
        if _routed(f):
            # moe_kernels' expert MLP saves no hidden rows: its backward gathers the tokens and
            # their output gradients again (k d each), recomputes the hidden rows and their
            # activation and holds their gradients before and after the gates and the
            # activation, 6 w + 3 k d. Of the layer's matmuls only the router's (E logits) is
            # an aten matmul.
            kd = w * d / f.expert_size
            G, S = G + 6 * w + 3 * kd, S + f.n_experts
            if ep > 1:  # the all-to-all's output, k tokens of d, is the experts' saved input
                A += kd
        else:
            A, G, S = A + 2 * w, G + 2 * w, S + w + d
    if c.arch == "smlp":
        return A + 6 * d + 2 * r * d, S + 3 * d, d, G
    i_ = c.n_heads * c.head_dim
    A, S, K = A + 4 * d + 5 * i_ + 2 * r * d, S + 2 * d + 3 * i_, d
    if c.arch == "transformer_xl":
        M, L = c.memory_length, c.seq_len
        A += M / L * (2 * d + 2 * i_) + c.n_heads * (L + M)
        S += M / L * 2 * i_ + c.n_heads * (L + M)
        K += M / L * d
    return A, S, K, G


def activations(model_cfg, train_cfg, micro_batch: int, layout: Layout) -> int:
    """Bytes of activations one rank holds for backward at its peak (see the module doc)."""
    c = model_cfg
    terms = [_layer_terms(c, i, layout.ep) for i in range(c.n_layers)]
    mode = layout.activation_checkpointing
    if mode == "none":
        body = sum(A for A, _, _, _ in terms) + max(G for _, _, _, G in terms)
    elif mode == "full":
        body = sum(K for _, _, K, _ in terms) + max(A + G for A, _, _, G in terms)
    else:
        body = sum(S for _, S, _, _ in terms) + max(A - S + G for A, S, _, G in terms)
    b = activation_bytes(train_cfg, layout)
    tokens = micro_batch * c.seq_len
    return math.ceil(tokens * (b * (body + 3 * c.d_model) + 12 * c.vocab_size))


def host_available() -> int | None:
    """Bytes of RAM a new allocation can get without swapping (None: unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_available(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available()


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _count(n: int) -> str:
    """A parameter count readable at every size (a tiny model is not "0.00B")."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def describe(p: Plan) -> str:
    """`about T (P parameters: ...)`, the parts that make up the total."""
    gathered = f"; FSDP's gathered copies {gib(p.gathered)}" if p.gathered else ""
    return (
        f"about {gib(p.total)} ({_count(p.parameters_total)} parameters: weights, gradients "
        f"and AdamW moments {gib(p.states)}{gathered}; activations {gib(p.activations)})"
    )


def preflight(
    model_cfg,
    train_cfg,
    micro_batch: int,
    device: torch.device,
    world_size=1,
    *,
    rank=0,
    fresh=True,
):
    """Raise a one-line CLIError when the plan of train_cfg's layout on world_size ranks
    exceeds what `device` has available, or (rank 0 of a fresh run, or one process) the whole
    fp32 model does not fit the host beside it."""
    if train_cfg.skip_memory_check:
        return
    p = plan(model_cfg, train_cfg, micro_batch, Layout.from_train(train_cfg, world_size))
    hint = "use a smaller model or batch, or train.skip_memory_check=true to try anyway"
    ranks = " per rank" if world_size > 1 else ""
    free = device_available(device)
    if free is not None and p.peak > free:
        needs = describe(p) if p.total >= p.build else f"{gib(p.build)} to build its shards"
        raise CLIError(
            f"the run needs {needs}{ranks} on {device} but {gib(free)} is available; {hint}"
        )
    if rank != 0 or not (fresh or world_size == 1):
        return
    # one process on the CPU: the model it builds is the one it trains, counted above
    beside = 0 if device.type == "cuda" else p.peak if world_size > 1 else None
    host = host_available()
    if beside is not None and host is not None and p.host + beside > host:
        where = f" on rank 0 (beside its {gib(beside)})" if beside else ""
        where = where or (" on rank 0" if world_size > 1 else "")
        raise CLIError(
            f"the model's fp32 weights need {gib(p.host)} of host memory to be built{where}, "
            f"{gib(host)} is available; {hint}"
        )
