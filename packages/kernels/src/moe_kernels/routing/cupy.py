"""The routing sort on CUDA as a CuPy RawKernel counting sort (histogram, exclusive scan, scatter).

Stable and deterministic without atomics: the N flat rows are cut into chunks of CHUNK rows; one
thread per chunk counts its rows per expert (histogram [n_chunks, E]), an exclusive scan in
(expert, chunk) order gives every (chunk, expert) pair its first output slot, and the same thread
then walks its chunk in order writing each row to the next slot of its expert. Tensors cross
between torch and CuPy through DLPack, so nothing is copied.

Importing this module needs CuPy; moe_kernels imports it only for CUDA tensors when it is installed.
"""

import cupy
import torch

from moe_kernels.routing.naive import Routing

CHUNK = 256

_SOURCE = r"""
extern "C" __global__ void chunk_histogram(
    const long long* idx, long long n, long long n_experts, long long chunk, long long* hist) {
    long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long lo = c * chunk;
    if (lo >= n) return;
    long long hi = min(lo + chunk, n);
    long long* row = hist + c * n_experts;
    for (long long i = lo; i < hi; ++i) row[idx[i]] += 1;
}

extern "C" __global__ void chunk_scatter(
    const long long* idx, long long n, long long n_experts, long long chunk,
    long long* next_slot, long long* order, long long* inverse) {
    long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long lo = c * chunk;
    if (lo >= n) return;
    long long hi = min(lo + chunk, n);
    long long* slot = next_slot + c * n_experts;
    for (long long i = lo; i < hi; ++i) {
        long long pos = slot[idx[i]]++;
        order[pos] = i;
        inverse[i] = pos;
    }
}
"""

_module = cupy.RawModule(code=_SOURCE)
_histogram = _module.get_function("chunk_histogram")
_scatter = _module.get_function("chunk_scatter")
_THREADS = 128


def _cp(t: torch.Tensor):
    return cupy.from_dlpack(t)


def sort_by_expert_cupy(idx_TK: torch.Tensor, n_experts: int) -> Routing:
    """Same result as sort_by_expert_naive (stable order), for idx on a CUDA device."""
    device = idx_TK.device
    flat_N = idx_TK.reshape(-1).to(torch.int64).contiguous()
    N = flat_N.numel()
    n_chunks = max(1, -(-N // CHUNK))
    hist_CE = torch.zeros(n_chunks, n_experts, dtype=torch.int64, device=device)
    order_N = torch.empty(N, dtype=torch.int64, device=device)
    inverse_N = torch.empty(N, dtype=torch.int64, device=device)
    blocks = (-(-n_chunks // _THREADS),)
    args = (cupy.int64(N), cupy.int64(n_experts), cupy.int64(CHUNK))
    stream = torch.cuda.current_stream(device).cuda_stream
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream):
        if N:
            _histogram(blocks, (_THREADS,), (_cp(flat_N), *args, _cp(hist_CE)))
        hist = _cp(hist_CE)
        counts_E = torch.from_dlpack(hist.sum(axis=0))
        # First slot of (chunk c, expert e): all rows of experts < e, plus expert e's rows in
        # chunks < c, so the exclusive scan runs over the histogram with experts outermost.
        hist_flat = cupy.ascontiguousarray(hist.T).ravel()
        starts_EC = (cupy.cumsum(hist_flat) - hist_flat).reshape(n_experts, n_chunks)
        next_slot_CE = torch.from_dlpack(cupy.ascontiguousarray(starts_EC.T))
        if N:
            _scatter(
                blocks,
                (_THREADS,),
                (_cp(flat_N), *args, _cp(next_slot_CE), _cp(order_N), _cp(inverse_N)),
            )
    offsets_E1 = torch.zeros(n_experts + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts_E, 0, out=offsets_E1[1:])
    return Routing(order_N, inverse_N, offsets_E1, counts_E)
