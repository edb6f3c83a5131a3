"""Language-model evaluation: mean per-token loss on a split, Transformer-XL memory carried."""

from __future__ import annotations

import contextlib
import sys

import moe_data
import torch
from tqdm import tqdm

from moe_train.distributed import DistEnv, sum_over_ranks


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model,
    tokens,
    *,
    batch_size: int,
    seq_len: int,
    env: DistEnv,
    precision: str = "fp32",
    max_batches: int = 0,
    progress: str | None = None,
) -> float:
    """Mean cross-entropy (nats/token) of `model` on `tokens`, over all ranks.

    Contiguous streams; each segment is fed the state the previous one returned (the
    Transformer-XL memory; the other architectures return none in evaluation and see each
    segment on its own). max_batches > 0 caps the work (an
    estimate, for evaluations during training); 0 reads the whole split. progress: the label of a
    tqdm bar on stderr (None: no bar).
    """
    was_training = model.training
    model.eval()
    batcher = moe_data.XLBatcher(
        tokens, batch_size, seq_len, rank=env.rank, world_size=env.world_size
    )
    n = len(batcher) if max_batches <= 0 else min(max_batches, len(batcher))
    total, count = 0.0, 0.0
    state = None
    bar = tqdm(total=n, desc=progress, unit="batch", disable=progress is None, file=sys.stderr)
    for i, (inputs, targets) in enumerate(batcher):
        if i >= n:
            break
        inputs = torch.as_tensor(inputs, dtype=torch.int64).to(env.device)
        targets = torch.as_tensor(targets, dtype=torch.int64).to(env.device)
        with autocast(env.device, precision):
            out = model(inputs, targets, state=state)
        state = out.state
        valid = int((targets != -100).sum())
        total += float(out.lm_loss) * valid
        count += valid
        bar.update(1)
    bar.close()
    total, count = sum_over_ranks([total, count], env)
    model.train(was_training)
    if count == 0:
        raise ValueError(
            f"split of {len(tokens)} tokens is too short for batches of {batch_size}x{seq_len}"
        )
    return total / count
