"""`moe-train` whose rank 1 kills itself (SIGKILL) in the middle of writing the checkpoint of
step KILL_AT_STEP: run by test_distributed.py under torchrun (pytest does not collect it)."""

import os
import signal
import sys

import torch.distributed as dist
from moe_train import checkpoint
from moe_train.cli import main

STEP = f"step-{int(os.environ['KILL_AT_STEP']):08d}"
real_save = checkpoint.atomic_save


def dying_save(payload, path):
    real_save(payload, path)
    if STEP in str(path) and dist.get_rank() == 1:
        # this rank's own part is written, its shards are not
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint.atomic_save = dying_save
sys.exit(main(sys.argv[1:]))
