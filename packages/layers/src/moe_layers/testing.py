"""HostReads for code built from moe_layers: moe_kernels.testing.HostReads (the dispatch mode that
records the ops which read device data back to the host) entering moe_layers' own custom op too,
the BASE auction (moe_layers::balanced_assignment), whose reads it keeps apart, one list per call.

    with HostReads(into_ops=False) as reads:
        model(tokens, targets).loss.backward()
    assert reads.ops == [...]  # the reads outside the auction, in order
    assert all(set(r) <= {"aten.is_nonzero.default"} for r in reads.auction_reads)

into_ops as for moe_kernels.testing.HostReads (False: the moe_kernels ops stay closed, for CPU
tensors, on which they run their CPU path).
"""

from __future__ import annotations

import math

import torch
from moe_kernels.testing import HostReads as KernelHostReads

from moe_layers.base_layer import _auction, _eps_phases

CONVERGED = "aten.is_nonzero.default"


class HostReads(KernelHostReads):
    def __init__(self, into_ops: bool = True):
        super().__init__(into_ops=into_ops)
        self.auction_reads: list[list[str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is not torch.ops.moe_layers.balanced_assignment.default:
            return super().__torch_dispatch__(func, types, args, kwargs)
        outer, self.ops = self.ops, []
        try:
            with self:
                return _auction(*args, **(kwargs or {}))
        finally:
            self.auction_reads.append(self.ops)
            self.ops = outer


def auction_read_bounds(n_tokens: int, max_rounds: int = 100_000) -> tuple[int, int]:
    """The fewest and the most convergence reads of one balanced_assignment of n_tokens tokens
    (see its docstring): per phase one, and at most 1 + ceil(log2(max_rounds + 1))."""
    phases = len(_eps_phases(n_tokens))
    return phases, phases * (1 + math.ceil(math.log2(max_rounds + 1)))
