"""The per-rank body of test_distributed.py's build test, run by torchrun with 4 processes.

`moe_train.build.build_model` on every 4-rank layout gives every rank the parameters and
buffers of the plain model built on one process with the same seed (tiny-hash: its hash table
is a buffer; tiny-sigma-moe; tiny-moeut: one layer applied in several places), and a buffer registered with persistent=False, which no state dict
carries, takes rank 0's values with and without initial weights. First, how far a rank's peak
resident memory grows while the model is built: rank 0's by the whole real model, every other
rank's by its shards and a tensor on its way, far less.
"""

from __future__ import annotations

import resource
import sys

import moe_models
import torch
import torch.distributed as dist
from moe_train import build
from moe_train.config import TrainConfig
from moe_train.parallelize import Layout, build_mesh
from torch.distributed.tensor import DTensor

LAYOUTS = (Layout(1, 4, 1), Layout(1, 4, 2), Layout(2, 2, 2), Layout(1, 4, 4))
SMALL = dict(d_model=16, n_layers=2, n_heads=2, seq_len=8, d_ff=24, dropout=0.0, vocab_size=37)
CPU = torch.device("cpu")


def config(preset: str, **sizes):
    return moe_models.get_config(preset, **{**SMALL, **sizes})


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def laid_out(cfg, layout: Layout, train: TrainConfig, weights: bool = True):
    return build.build_model(cfg, train, build_mesh(layout, CPU), layout, CPU, weights=weights)


def check_weights(preset: str, layout: Layout) -> None:
    train = TrainConfig(seed=5)
    cfg = config(preset)
    model = laid_out(cfg, layout, train)
    torch.manual_seed(train.seed)
    expected = moe_models.build(cfg).state_dict()
    got = model.state_dict()
    assert sorted(got) == sorted(expected), (preset, layout)
    for name, value in got.items():
        assert torch.equal(full(value), expected[name]), f"{preset} {layout.describe()}: {name}"


def check_loose_buffer() -> None:
    """A buffer outside the state dict: rank 0's real model's, on every rank."""
    plain_build = moe_models.build

    def with_buffer(cfg):
        model = plain_build(cfg)
        model.register_buffer("table", torch.randn(5, 3), persistent=False)
        return model

    build.moe_models.build = with_buffer
    try:
        train, cfg, layout = TrainConfig(seed=9), config("tiny-sigma-moe"), Layout(1, 4, 2)
        torch.manual_seed(train.seed)
        expected = with_buffer(cfg).table
        for weights in (True, False):
            model = laid_out(cfg, layout, train, weights=weights)
            assert "table" not in model.state_dict()
            assert torch.equal(model.table, expected), weights
    finally:
        build.moe_models.build = plain_build


def rss_growth(fn) -> int:
    """How far this process's peak resident memory grew while fn() ran (bytes). (The torch
    profiler's memory events miss the frees of tensors whose last reference a backend's thread
    drops, as gloo's does.)"""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def check_memory(rank: int) -> None:
    cfg = config("tiny-sigma-moe", d_model=256, n_layers=16, d_ff=1024, vocab_size=256)
    with torch.device("meta"):
        whole = sum(4 * p.numel() for p in moe_models.build(cfg).parameters())
    growth = rss_growth(lambda: laid_out(cfg, Layout(1, 4, 1), TrainConfig()))
    print(
        f"rank {rank}: resident memory grew {growth / 2**20:.1f} MiB while the model was built;"
        f" the whole model is {whole / 2**20:.1f} MiB",
        file=sys.stderr,
    )
    if rank == 0:
        assert growth >= 0.9 * whole, (growth, whole)
    else:
        # a quarter of the model, and a whole tensor at a time on its way to the shards
        assert growth < 0.5 * whole, (growth, whole)


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        check_memory(dist.get_rank())
        for preset in ("tiny-hash", "tiny-sigma-moe", "tiny-moeut"):
            for layout in LAYOUTS:
                check_weights(preset, layout)
        check_loose_buffer()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
