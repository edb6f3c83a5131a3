"""The expert matmul: reference, CPU fast path, Triton kernels and their autograd Functions."""
