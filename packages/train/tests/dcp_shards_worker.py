"""Two ranks save DTensors to a DCP folder in $OUT: rows sharded unevenly (5 over 2), columns
sharded (7 over 2, bf16), one replicated; run by test_dcp_reader.py under torchrun (pytest does
not collect it)."""

import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
model = {
    "rows": distribute_tensor(
        torch.arange(5 * 3, dtype=torch.float32).view(5, 3), mesh, [Shard(0)]
    ),
    "columns": distribute_tensor(
        torch.arange(2 * 7).view(2, 7).to(torch.bfloat16), mesh, [Shard(1)]
    ),
    "both": distribute_tensor(torch.full((4,), 2.5), mesh, [Replicate()]),
}
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    dcp.save({"model": model, "optimizer": {"step": 3}}, checkpoint_id=os.environ["OUT"])
dist.destroy_process_group()
