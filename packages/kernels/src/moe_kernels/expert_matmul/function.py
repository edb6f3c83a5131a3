"""The autograd Functions of the expert matmul and expert MLP, and the dispatch by device/dtype.

Both work on (token, slot) rows in expert-sorted order from the single routing sort to the end:
the inputs are gathered once, the hidden activations of the MLP stay sorted through both
matmuls, gates weight the sorted rows, and only the final outputs (and the input gradients) are
summed back into token order. The backward passes are written by hand so that nothing is
gathered twice and autograd keeps no per-op buffers.
"""

import torch

from moe_kernels.expert_matmul.activations import activate, activate_backward
from moe_kernels.expert_matmul.cpu import choose_torch_backend
from moe_kernels.expert_matmul.rows import Rows
from moe_kernels.routing.dispatch import sort_by_expert

BACKENDS = ("auto", "torch", "torch_grouped", "torch_padded", "triton")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_backend(backend: str, x: torch.Tensor, idx_TK: torch.Tensor, n_experts: int):
    """'auto': Triton for CUDA tensors in fp32/fp16/bf16, the torch backend otherwise (the CPU and
    fp64). 'torch' picks its layout by the padding it would cost; 'torch_grouped' and
    'torch_padded' force one. 'triton' forces the kernels, e.g. on CPU tensors under
    TRITON_INTERPRET=1."""
    routing = sort_by_expert(idx_TK, n_experts)
    K = idx_TK.shape[1]
    if backend == "triton" or (backend == "auto" and x.is_cuda and x.dtype in _TRITON_DTYPES):
        from moe_kernels.expert_matmul.triton import TritonBackend

        return TritonBackend(routing, K)
    layout = {"torch_grouped": "grouped", "torch_padded": "padded"}.get(backend, "auto")
    return choose_torch_backend(routing, K, layout)


def _row_dot(a_NO: torch.Tensor, b_NO: torch.Tensor) -> torch.Tensor:
    """Per-row dot product accumulated in fp32 at least (the gate gradients)."""
    acc = torch.promote_types(a_NO.dtype, torch.float32)
    return (a_NO.to(acc) * b_NO.to(acc)).sum(-1)


class ExpertMatmulFunction(torch.autograd.Function):
    """x [T, I] or [T, K, I], w [E, I, O], idx [T, K], gates [T, K] or None -> [T, K, O] or [T, O].

    The gate gradient <dy, x @ w> is taken as <dy @ w^T, x>, so the outputs are never saved.
    """

    @staticmethod
    def forward(ctx, x, w_EIO, idx_TK, gates_TK, backend):
        T, K = idx_TK.shape
        be = make_backend(backend, x, idx_TK, w_EIO.shape[0])
        if x.dim() == 2:
            xs = be.take_tokens(x)
        else:
            xs = be.take_flat(x.reshape(T * K, x.shape[-1]))
        ys_NO = be.mm(xs, w_EIO)
        if gates_TK is None:
            out = be.unsort(ys_NO).view(T, K, w_EIO.shape[2])
            gs_N1 = None
        else:
            gs_N1 = be.row_gates(gates_TK)
            out = be.sum_slots(ys_NO * gs_N1)
        ctx.be, ctx.x_shape = be, x.shape
        ctx.save_for_backward(xs.data, xs.index, w_EIO, gs_N1)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        be = ctx.be
        xs_data, xs_index, w_EIO, gs_N1 = ctx.saved_tensors
        xs = Rows(xs_data, xs_index)
        T, K = ctx.x_shape[0], be.n_slots
        need_x, need_w, _, need_gates, _ = ctx.needs_input_grad
        if gs_N1 is None:
            dys = be.take_flat(grad_out.reshape(T * K, w_EIO.shape[2]))
        else:
            dys = be.take_tokens(grad_out)  # not yet weighted by the gates
        dx = dw = dgates = None
        if need_x or need_gates:
            dxs_NI = be.mm(dys, w_EIO, transpose=True)
            if gs_N1 is not None:
                if need_gates:
                    dgates = be.unsort(_row_dot(dxs_NI, xs.materialize()))
                    dgates = dgates.view(T, K).to(gs_N1.dtype)
                dxs_NI = dxs_NI * gs_N1
            if need_x and len(ctx.x_shape) == 2:
                dx = be.sum_slots(dxs_NI)
            elif need_x:
                dx = be.unsort(dxs_NI).view(ctx.x_shape)
        if need_w:
            if gs_N1 is not None:
                xs = Rows(xs.materialize() * gs_N1)
            dw = be.mm_dw(xs, dys)
        return dx, dw, None, dgates, None


class ExpertMLPFunction(torch.autograd.Function):
    """x [T, D], w1 [E, D, G], w2 [E, G, D], idx [T, K], gates [T, K] -> [T, D]."""

    @staticmethod
    def forward(ctx, x_TD, w1_EDG, w2_EGD, idx_TK, gates_TK, activation, backend):
        be = make_backend(backend, x_TD, idx_TK, w1_EDG.shape[0])
        gs_N1 = be.row_gates(gates_TK)
        xs = be.take_tokens(x_TD)
        h_NG = be.mm(xs, w1_EDG)
        ag_NG = activate(activation, h_NG) * gs_N1
        out_TD = be.sum_slots(be.mm(Rows(ag_NG), w2_EGD))
        ctx.be, ctx.activation = be, activation
        ctx.save_for_backward(xs.data, xs.index, w1_EDG, w2_EGD, h_NG, gs_N1)
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        be = ctx.be
        xs_data, xs_index, w1_EDG, w2_EGD, h_NG, gs_N1 = ctx.saved_tensors
        xs = Rows(xs_data, xs_index)
        T, K = grad_TD.shape[0], be.n_slots
        a_NG = activate(ctx.activation, h_NG)
        dout = be.take_tokens(grad_TD)
        da_NG = be.mm(dout, w2_EGD, transpose=True)  # gradient of the unweighted activations
        dgates = None
        if ctx.needs_input_grad[4]:
            dgates = be.unsort(_row_dot(da_NG, a_NG)).view(T, K).to(gs_N1.dtype)
        dw2 = None
        if ctx.needs_input_grad[2]:
            dw2 = be.mm_dw(Rows(a_NG * gs_N1), dout)
        dh_NG = activate_backward(ctx.activation, h_NG, da_NG * gs_N1)
        dh = Rows(dh_NG)
        dx = dw1 = None
        if ctx.needs_input_grad[1]:
            dw1 = be.mm_dw(xs, dh)
        if ctx.needs_input_grad[0]:
            dx = be.sum_slots(be.mm(dh, w1_EDG, transpose=True))
        return dx, dw1, dw2, None, dgates, None, None
