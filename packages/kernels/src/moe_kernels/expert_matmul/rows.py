"""Rows: a lazily gathered row view shared by the backends of the expert matmul."""

from typing import NamedTuple

import torch


class Rows(NamedTuple):
    """Row n is data[index[n]] (index None: data[n]). Triton kernels gather inside their loads;
    the torch backend materializes the gather once so that backward reuses it."""

    data: torch.Tensor
    index: torch.Tensor | None = None

    def materialize(self) -> torch.Tensor:
        return self.data if self.index is None else self.data.index_select(0, self.index)
