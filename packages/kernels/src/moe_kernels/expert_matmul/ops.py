"""The expert matmul and expert MLP as custom ops (torch.library), with fake implementations and
autograd formulas, so that torch.compile sees one op of known output shapes per call.

Ops (namespace moe_kernels):
  expert_matmul(x, w, idx, gates?, backend) -> (out, order, inverse, offsets, counts, xs)
  expert_matmul_backward(grad, x?, w, gates?, order, inverse, offsets, counts, xs, backend,
                         x_per_slot, need_x, need_w, need_gates) -> (dx, dw, dgates)
  expert_mlp(x, w1, w2, w3?, idx, gates, activation, backend) -> (out, order, inverse,
                                                                   offsets, counts, h)
  expert_mlp_backward(grad, x, w1, w2, w3?, idx, gates, order, inverse, offsets, counts, h,
                      activation, backend, need_x, need_w1, need_w2, need_w3, need_gates)
                      -> (dx, dw1, dw2, dw3, dgates)
The forward ops return, beside the output, what their backward needs: the routing (so that it is
sorted once), xs the gathered input rows [N, d_in] of the torch backend's expert_matmul ([0, d_in]
for Triton, whose kernels gather inside their loads, so x itself is saved instead) and h the
hidden rows [N, G] of the Triton MLP, N = T * K: the pre-activations, or for relu the
activations (whose sign gives the same derivative and spares recomputing them); for a gated
activation both pre-activations side by side, [N, 2G]. The MLP saves x on every backend and
gathers it again in the backward: one gather, where saving the gathered rows costs two on the
padded layout (compacting them, then padding them again). The torch backend's MLP saves neither
routing nor hidden rows (empty outputs): it runs token chunks one after the other and redoes
each chunk's sort and first product in the backward (see _mlp_body). Saved rows are always the N
expert-sorted rows (the padded layout converts), so every output shape follows from the input
shapes and the backend name: the fake implementations need no data-dependent size, and dynamo
never breaks the graph at these ops. A gradient not needed comes back as an empty tensor.

Both work on (token, slot) rows in expert-sorted order from the routing sort to the end: the
inputs are gathered once, the hidden activations of the MLP stay sorted through both matmuls,
gates weight the sorted rows, and only the final outputs (and the input gradients) are summed
back into token order.
"""

import importlib.util

import torch
from torch import Tensor

from moe_kernels.expert_matmul.activations import (
    activate,
    activate_backward,
    activate_gated,
    activate_gated_backward,
)
from moe_kernels.expert_matmul.cpu import choose_torch_backend
from moe_kernels.expert_matmul.rows import Rows
from moe_kernels.library import define, register_autograd, register_fake
from moe_kernels.routing.dispatch import sort_routing
from moe_kernels.routing.naive import Routing
from moe_kernels.routing.validate import check_idx_values

BACKENDS = ("auto", "torch", "torch_grouped", "torch_padded", "triton")
MLP_BACKENDS = (*BACKENDS, "gather", "chosen")  # the small-batch paths (expert_matmul.gathered)
# The torch backend's expert MLP runs token chunks of about max(CHUNK_ROWS, 64 E) (token, slot)
# rows one after the other, so that the gathered inputs and the outputs of the products ([rows, D]
# each) stay chunk-sized rather than N = T * K rows. 64 rows per expert on average keep the padded
# layout's padding to the largest count small. Measured on the 2-core VM (loaded, 1 thread, fp32
# forward+backward over the dense same-FLOPs MLP) at (T, D, E, G, K) = (2048, 256, 64, 32, 8),
# (2048, 512, 128, 64, 8) and (512, 412, 16, 128, 4): chunks of 2048 rows 5.0x, 6.5x, 2.3x;
# 4096: 3.9x, 5.0x, 2.3x; 8192: 3.8x, 4.2x, 2.2x; unchunked 4.1x, 4.9x, 2.1x.
CHUNK_ROWS = 4096
MIN_ROWS_PER_EXPERT = 64
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Triton is optional (CUDA builds of torch bring it); without it 'auto' stays on the torch backend
HAS_TRITON = importlib.util.find_spec("triton") is not None


def uses_triton(backend: str, like: Tensor) -> bool:
    """'auto': Triton for CUDA tensors in fp32/fp16/bf16 when Triton is installed, the torch
    backend otherwise (the CPU and fp64). 'triton' forces the kernels, e.g. on CPU tensors under
    TRITON_INTERPRET=1."""
    return backend == "triton" or (
        backend == "auto" and HAS_TRITON and like.is_cuda and like.dtype in _TRITON_DTYPES
    )


def make_backend(backend: str, like: Tensor, routing: Routing, n_slots: int):
    """'torch' picks its layout by the padding it would cost; 'torch_grouped' and 'torch_padded'
    force one. The choice is a function of the routing, so the backward makes the same one."""
    if uses_triton(backend, like):
        from moe_kernels.expert_matmul.triton import TritonBackend

        return TritonBackend(routing, n_slots)
    layout = {"torch_grouped": "grouped", "torch_padded": "padded"}.get(backend, "auto")
    return choose_torch_backend(routing, n_slots, layout)


def _route(idx_TK: Tensor, n_experts: int, backend: str, like: Tensor) -> Routing:
    """The one check of the ids and the one routing sort of an op. The Triton path checks
    asynchronously, as it does on CUDA, so that it stays free of host reads."""
    on_device = idx_TK.is_cuda or uses_triton(backend, like)
    check_idx_values(idx_TK, n_experts, asynchronous=on_device)
    return sort_routing(idx_TK, n_experts)


def _input_rows(be, x: Tensor) -> Rows:
    """The sorted input rows: x [T, I] by token, x [T, K, I] by (token, slot)."""
    if x.dim() == 2:
        return be.take_tokens(x)
    return be.take_flat(x.reshape(-1, x.shape[-1]))


def _saved_rows(be, xs: Rows, d_in: int) -> Tensor:
    """The gathered rows for the backward, or [0, d_in] where they stay a lazy gather of x."""
    return be.compact(xs.data) if xs.index is None else xs.data.new_empty(0, d_in)


def _backward_rows(be, x: Tensor | None, xs_NI: Tensor) -> Rows:
    """The forward's input rows: saved gathered, or (x saved, Triton) the same lazy gather."""
    return be.from_compact(xs_NI) if x is None else _input_rows(be, x)


def _row_dot(a_NO: Tensor, b_NO: Tensor) -> Tensor:
    """Per-row dot product accumulated in fp32 at least (the gate gradients)."""
    acc = torch.promote_types(a_NO.dtype, torch.float32)
    return (a_NO.to(acc) * b_NO.to(acc)).sum(-1)


def _fake_saved_rows(backend: str, like: Tensor, n_rows: int) -> int:
    """Rows of the saved xs: none for Triton, the N sorted rows for the torch backend."""
    return 0 if uses_triton(backend, like) else n_rows


def _fake_routing(idx_TK: Tensor, n_experts: int) -> list[Tensor]:
    N = idx_TK.numel()
    return [
        idx_TK.new_empty(N, dtype=torch.long),
        idx_TK.new_empty(N, dtype=torch.long),
        idx_TK.new_empty(n_experts + 1, dtype=torch.long),
        idx_TK.new_empty(n_experts, dtype=torch.long),
    ]


def _needed(grads, needed) -> tuple:
    """The gradients asked for, None for the others (the op returns those as empty tensors)."""
    return tuple(g if need else None for g, need in zip(grads, needed, strict=True))


def _matmul_body(
    x: Tensor, w_EIO: Tensor, idx_TK: Tensor, gates_TK: Tensor | None, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, K = idx_TK.shape
    E, I, O = w_EIO.shape
    routing = _route(idx_TK, E, backend, x)
    be = make_backend(backend, x, routing, K)
    xs = _input_rows(be, x)
    ys_NO = be.mm(xs, w_EIO)
    if gates_TK is None:
        out = be.unsort(ys_NO).view(T, K, O)
    else:
        out = be.sum_slots(ys_NO * be.row_gates(gates_TK))
    return out, *routing, _saved_rows(be, xs, I)


expert_matmul_op = define("expert_matmul", _matmul_body)


@register_fake(expert_matmul_op)
def _(x, w_EIO, idx_TK, gates_TK, backend):
    T, K = idx_TK.shape
    E, I, O = w_EIO.shape
    out = x.new_empty(T, K, O) if gates_TK is None else x.new_empty(T, O)
    R = _fake_saved_rows(backend, x, T * K)
    return out, *_fake_routing(idx_TK, E), x.new_empty(R, I)


def _matmul_backward_body(
    grad_out: Tensor,
    x: Tensor | None,
    w_EIO: Tensor,
    gates_TK: Tensor | None,
    order_N: Tensor,
    inverse_N: Tensor,
    offsets_E1: Tensor,
    counts_E: Tensor,
    xs_NI: Tensor,
    backend: str,
    x_per_slot: bool,
    need_x: bool,
    need_w: bool,
    need_gates: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gate gradient <dy, x @ w> is taken as <dy @ w^T, x>, so the outputs are never saved."""
    T = grad_out.shape[0]
    E, I, O = w_EIO.shape
    gated = gates_TK is not None
    K = gates_TK.shape[1] if gated else grad_out.shape[1]
    be = make_backend(backend, w_EIO, Routing(order_N, inverse_N, offsets_E1, counts_E), K)
    xs = _backward_rows(be, x, xs_NI)
    if gated:
        gs_N1 = be.row_gates(gates_TK)
        dys = be.take_tokens(grad_out)  # not yet weighted by the gates
    else:
        dys = be.take_flat(grad_out.reshape(T * K, O))
    dx, dw, dgates = (w_EIO.new_empty(0) for _ in range(3))
    if need_x or need_gates:
        dxs_NI = be.mm(dys, w_EIO, transpose=True)
        if gated:
            if need_gates:
                dgates = be.unsort(_row_dot(dxs_NI, xs.materialize()))
                dgates = dgates.view(T, K).to(gates_TK.dtype)
            dxs_NI = dxs_NI * gs_N1
        if need_x and not x_per_slot:
            dx = be.sum_slots(dxs_NI)
        elif need_x:
            dx = be.unsort(dxs_NI).view(T, K, I)
    if need_w:
        if gated:
            xs = Rows(xs.materialize() * gs_N1)
        dw = be.mm_dw(xs, dys)
    return dx, dw, dgates


expert_matmul_backward_op = define("expert_matmul_backward", _matmul_backward_body)


@register_fake(expert_matmul_backward_op)
def _(grad_out, x, w_EIO, gates_TK, order_N, inverse_N, offsets_E1, counts_E, xs_NI, backend,
      x_per_slot, need_x, need_w, need_gates):  # fmt: skip
    T = grad_out.shape[0]
    E, I, O = w_EIO.shape
    K = gates_TK.shape[1] if gates_TK is not None else grad_out.shape[1]
    dx = w_EIO.new_empty((T, K, I) if x_per_slot else (T, I)) if need_x else w_EIO.new_empty(0)
    dw = w_EIO.new_empty(E, I, O) if need_w else w_EIO.new_empty(0)
    dgates = w_EIO.new_empty(T, K) if need_gates else w_EIO.new_empty(0)
    return dx, dw, dgates


def _matmul_setup_context(ctx, inputs, output):
    x, w_EIO, idx_TK, gates_TK, backend = inputs
    _, *routing, xs_NI = output
    ctx.mark_non_differentiable(xs_NI)
    ctx.set_materialize_grads(False)
    ctx.backend, ctx.x_per_slot = backend, x.dim() == 3
    ctx.save_for_backward(x if uses_triton(backend, x) else None, w_EIO, gates_TK, *routing, xs_NI)


def _matmul_backward(ctx, grad_out, *_):
    need_x, need_w, _, need_gates, _ = ctx.needs_input_grad
    if grad_out is None:
        return None, None, None, None, None
    x, w_EIO, gates_TK, *routing, xs_NI = ctx.saved_tensors
    need_gates = need_gates and gates_TK is not None
    grads = expert_matmul_backward_op(
        grad_out, x, w_EIO, gates_TK, *routing, xs_NI,
        ctx.backend, ctx.x_per_slot, need_x, need_w, need_gates,
    )  # fmt: skip
    dx, dw, dgates = _needed(grads, (need_x, need_w, need_gates))
    return dx, dw, None, dgates, None


register_autograd(expert_matmul_op, _matmul_backward, setup_context=_matmul_setup_context)


def _mlp_forward_rows(
    be, x_TD: Tensor, w1_EDG: Tensor, w2_EGD: Tensor, w3_EDG: Tensor | None, gates_TK: Tensor,
    activation: str, save_hidden: bool,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(out [T, D], the hidden rows to save [N, H] in sorted order, or None) of the tokens of be."""
    gs_N1 = be.row_gates(gates_TK)
    xs = be.take_tokens(x_TD, zero_pads=False)  # pads meet zero gates before any output
    h_NG = be.mm(xs, w1_EDG)
    if w3_EDG is None:
        a_NG = activate(activation, h_NG)
        hidden_NH = a_NG if activation == "relu" else h_NG
    else:
        u_NG = be.mm(xs, w3_EDG)
        a_NG = activate_gated(activation, h_NG, u_NG)
        hidden_NH = torch.cat([h_NG, u_NG], 1) if save_hidden else None
    del xs, h_NG  # the rows of the first product go before the second allocates its own
    out_TD = be.sum_slots(be.mm(Rows(a_NG * gs_N1), w2_EGD))
    return out_TD, be.compact(hidden_NH) if save_hidden else None


def _mlp_backward_rows(
    be, grad_TD: Tensor, x_TD: Tensor, w1_EDG: Tensor, w2_EGD: Tensor, w3_EDG: Tensor | None,
    gates_TK: Tensor, hidden_sorted_NH: Tensor | None, activation: str, needs: tuple[bool, ...],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dw1, dw2, dw3, dgates) of the tokens of be, empty where not needed. It gathers x
    again (see the module doc), and without saved hidden rows (None) recomputes them from it.
    Gated activations saved both hidden rows, [h | u]."""
    need_x, need_w1, need_w2, need_w3, need_gates = needs
    T, K = gates_TK.shape
    G = w1_EDG.shape[2]
    # pad rows are left unzeroed: each product below that reaches a gradient multiplies them by a
    # zero gate (dw2 and dh through gs, dw1 through dh)
    xs = be.take_tokens(x_TD, zero_pads=False) if hidden_sorted_NH is None else None
    gs_N1 = be.row_gates(gates_TK)
    if hidden_sorted_NH is not None:
        hidden_NH = be.from_compact(hidden_sorted_NH, zero_pads=False).data
        h_NG = hidden_NH[:, :G]
        u_NG = None if w3_EDG is None else hidden_NH[:, G:]
    else:
        h_NG = be.mm(xs, w1_EDG)
        u_NG = None if w3_EDG is None else be.mm(xs, w3_EDG)
        if activation == "relu":  # the saved form of relu: the activations
            h_NG = activate(activation, h_NG)
    if w3_EDG is None:
        a_NG = h_NG if activation == "relu" else activate(activation, h_NG)
    else:
        a_NG = activate_gated(activation, h_NG, u_NG)
    dout = be.take_tokens(grad_TD, zero_pads=False)
    da_NG = be.mm(dout, w2_EGD, transpose=True)  # gradient of the unweighted activations
    dx, dw1, dw2, dw3, dgates = (w1_EDG.new_empty(0) for _ in range(5))
    if need_gates:
        dgates = be.unsort(_row_dot(da_NG, a_NG)).view(T, K).to(gates_TK.dtype)
    if need_w2:
        dw2 = be.mm_dw(Rows(a_NG * gs_N1), dout)
    del dout, a_NG
    if not (need_x or need_w1 or need_w3):
        return dx, dw1, dw2, dw3, dgates
    if w3_EDG is None:
        dhs = [activate_backward(activation, h_NG, da_NG * gs_N1)]
    else:
        dhs = list(activate_gated_backward(activation, h_NG, u_NG, da_NG * gs_N1))
    del h_NG, u_NG, da_NG
    if need_w1 or need_w3:
        if xs is None:
            xs = be.take_tokens(x_TD, zero_pads=False)
        if need_w1:
            dw1 = be.mm_dw(xs, Rows(dhs[0]))
        if need_w3:
            dw3 = be.mm_dw(xs, Rows(dhs[1]))
        del xs
    if need_x:
        dxs_ND = be.mm(Rows(dhs[0]), w1_EDG, transpose=True)
        if w3_EDG is not None:
            dxs_ND += be.mm(Rows(dhs[1]), w3_EDG, transpose=True)
        dx = be.sum_slots(dxs_ND)
    return dx, dw1, dw2, dw3, dgates


def _torch_chunks(T: int, K: int, E: int) -> list[tuple[int, int]]:
    """Token ranges the torch backend runs one after the other (see CHUNK_ROWS)."""
    step = max(1, max(CHUNK_ROWS, MIN_ROWS_PER_EXPERT * E) // K)
    return [(t0, min(t0 + step, T)) for t0 in range(0, T, step)]


def _mlp_body(
    x_TD: Tensor,
    w1_EDG: Tensor,
    w2_EGD: Tensor,
    w3_EDG: Tensor | None,
    idx_TK: Tensor,
    gates_TK: Tensor,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The Triton path sorts all rows once and saves the routing and the hidden rows. The torch
    backend runs token chunks one after the other, so that it never holds more than a chunk's
    gathered rows, and saves neither: the backward sorts each chunk again from idx and recomputes
    its hidden rows from x (one product more, in exchange for the N x G rows every layer kept
    until its backward); its routing and hidden outputs are empty."""
    T, K = idx_TK.shape
    E = w1_EDG.shape[0]
    weights = (w1_EDG, w2_EGD, w3_EDG)
    if uses_triton(backend, x_TD):
        routing = _route(idx_TK, E, backend, x_TD)
        be = make_backend(backend, x_TD, routing, K)
        out_TD, hidden_NH = _mlp_forward_rows(be, x_TD, *weights, gates_TK, activation, True)
        return out_TD, *routing, hidden_NH
    check_idx_values(idx_TK, E, asynchronous=idx_TK.is_cuda)
    out_TD = x_TD.new_empty(T, x_TD.shape[1])
    for t0, t1 in _torch_chunks(T, K, E):
        be = make_backend(backend, x_TD, sort_routing(idx_TK[t0:t1], E), K)
        out_TD[t0:t1] = _mlp_forward_rows(
            be, x_TD[t0:t1], *weights, gates_TK[t0:t1], activation, False
        )[0]
    return out_TD, *_no_routing(idx_TK), x_TD.new_empty(0, w1_EDG.shape[2])


expert_mlp_op = define("expert_mlp", _mlp_body)


def _no_routing(idx_TK: Tensor) -> list[Tensor]:
    return [idx_TK.new_empty(0, dtype=torch.long) for _ in range(4)]


@register_fake(expert_mlp_op)
def _(x_TD, w1_EDG, w2_EGD, w3_EDG, idx_TK, gates_TK, activation, backend):
    T, K = idx_TK.shape
    E, D, G = w1_EDG.shape
    if not uses_triton(backend, x_TD):
        return x_TD.new_empty(T, D), *_no_routing(idx_TK), x_TD.new_empty(0, G)
    H = G if w3_EDG is None else 2 * G
    return x_TD.new_empty(T, D), *_fake_routing(idx_TK, E), x_TD.new_empty(T * K, H)


def _mlp_backward_body(
    grad_TD: Tensor,
    x_TD: Tensor,
    w1_EDG: Tensor,
    w2_EGD: Tensor,
    w3_EDG: Tensor | None,
    idx_TK: Tensor,
    gates_TK: Tensor,
    order_N: Tensor,
    inverse_N: Tensor,
    offsets_E1: Tensor,
    counts_E: Tensor,
    hidden_sorted_NH: Tensor,
    activation: str,
    backend: str,
    need_x: bool,
    need_w1: bool,
    need_w2: bool,
    need_w3: bool,
    need_gates: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The routing saved by the Triton path, or the torch backend's chunks sorted again."""
    T, K = gates_TK.shape
    E = w1_EDG.shape[0]
    needs = (need_x, need_w1, need_w2, need_w3, need_gates)
    weights = (w1_EDG, w2_EGD, w3_EDG)
    if uses_triton(backend, w1_EDG):
        be = make_backend(backend, w1_EDG, Routing(order_N, inverse_N, offsets_E1, counts_E), K)
        return _mlp_backward_rows(
            be, grad_TD, x_TD, *weights, gates_TK, hidden_sorted_NH, activation, needs
        )
    dx, dw1, dw2, dw3, dgates = (w1_EDG.new_empty(0) for _ in range(5))
    if need_x:
        dx = grad_TD.new_empty(grad_TD.shape)
    if need_gates:
        dgates = gates_TK.new_empty(gates_TK.shape)
    for t0, t1 in _torch_chunks(T, K, E):
        be = make_backend(backend, w1_EDG, sort_routing(idx_TK[t0:t1], E), K)
        grads = _mlp_backward_rows(
            be, grad_TD[t0:t1], x_TD[t0:t1], *weights, gates_TK[t0:t1], None, activation, needs,
        )  # fmt: skip
        if need_x:
            dx[t0:t1] = grads[0]
        if need_gates:
            dgates[t0:t1] = grads[4]
        if t0 == 0:
            dw1, dw2, dw3 = grads[1:4]
        else:
            for dw, dw_chunk in zip((dw1, dw2, dw3), grads[1:4], strict=True):
                dw += dw_chunk
    if T == 0:
        dw1, dw2, dw3 = (
            w.new_zeros(w.shape) if need else w.new_empty(0)
            for w, need in zip((w1_EDG, w2_EGD, w1_EDG), (need_w1, need_w2, need_w3), strict=True)
        )
    return dx, dw1, dw2, dw3, dgates


expert_mlp_backward_op = define("expert_mlp_backward", _mlp_backward_body)


@register_fake(expert_mlp_backward_op)
def _(grad_TD, x_TD, w1_EDG, w2_EGD, w3_EDG, idx_TK, gates_TK, order_N, inverse_N, offsets_E1,
      counts_E, h_NH, activation, backend, need_x, need_w1, need_w2, need_w3, need_gates):  # fmt: skip
    def grad(need, *shape):
        return w1_EDG.new_empty(*shape) if need else w1_EDG.new_empty(0)

    return (
        grad(need_x, *grad_TD.shape),
        grad(need_w1, *w1_EDG.shape),
        grad(need_w2, *w2_EGD.shape),
        grad(need_w3, *w1_EDG.shape),
        grad(need_gates, *gates_TK.shape),
    )


def _mlp_setup_context(ctx, inputs, output):
    x_TD, w1_EDG, w2_EGD, w3_EDG, idx_TK, gates_TK, activation, backend = inputs
    _, *routing, hidden_NH = output
    ctx.mark_non_differentiable(hidden_NH)
    ctx.set_materialize_grads(False)
    ctx.activation, ctx.backend = activation, backend
    ctx.save_for_backward(x_TD, w1_EDG, w2_EGD, w3_EDG, idx_TK, gates_TK, *routing, hidden_NH)


def _mlp_backward(ctx, grad_TD, *_):
    need_x, need_w1, need_w2, need_w3, _, need_gates, _, _ = ctx.needs_input_grad
    if grad_TD is None:
        return (None,) * 8
    x_TD, w1_EDG, w2_EGD, w3_EDG, *rest = ctx.saved_tensors
    need_w3 = need_w3 and w3_EDG is not None
    grads = expert_mlp_backward_op(
        grad_TD, x_TD, w1_EDG, w2_EGD, w3_EDG, *rest, ctx.activation, ctx.backend,
        need_x, need_w1, need_w2, need_w3, need_gates,
    )  # fmt: skip
    dx, dw1, dw2, dw3, dgates = _needed(grads, (need_x, need_w1, need_w2, need_w3, need_gates))
    return dx, dw1, dw2, dw3, None, dgates, None, None


register_autograd(expert_mlp_op, _mlp_backward, setup_context=_mlp_setup_context)
