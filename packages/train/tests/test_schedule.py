"""The learning-rate schedule: warmup reaches the peak, decay ends at min_lr_ratio, monotone."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_train.config import TrainConfig
from moe_train.schedule import lr_factor, make_scheduler


@given(
    max_steps=st.integers(1, 400),
    warmup=st.integers(0, 50),
    schedule=st.sampled_from(["cosine", "linear", "constant"]),
    min_ratio=st.floats(0.0, 1.0),
)
def test_shape_of_the_schedule(max_steps, warmup, schedule, min_ratio):
    f = [
        lr_factor(
            s, max_steps=max_steps, warmup_steps=warmup, schedule=schedule, min_ratio=min_ratio
        )
        for s in range(max_steps + warmup + 2)
    ]
    if warmup:
        assert f[0] == 1 / warmup
        assert all(b > a for a, b in zip(f[: warmup - 1], f[1:warmup], strict=True))
    assert math.isclose(f[warmup], 1.0) or (schedule != "constant" and max_steps <= warmup)
    after = f[warmup:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:], strict=False))
    end = 1.0 if schedule == "constant" else min_ratio
    if max_steps > warmup:
        assert math.isclose(f[max_steps], end, abs_tol=1e-9)
    assert all(0.0 < x <= 1.0 for x in f[:warmup])
    assert all(min_ratio - 1e-9 <= x <= 1.0 + 1e-9 for x in after)


def test_cosine_midpoint_is_halfway_between_peak_and_floor():
    mid = lr_factor(60, max_steps=110, warmup_steps=10, schedule="cosine", min_ratio=0.2)
    assert math.isclose(mid, 0.6)


def test_scheduler_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    cfg = TrainConfig(max_steps=4, warmup_steps=2, schedule="linear", min_lr_ratio=0.0, lr=2.0)
    sched = make_scheduler(opt, cfg)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [1.0, 2.0, 2.0, 1.0]
