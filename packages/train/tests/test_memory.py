"""The memory plan (moe_train.memory): its formulas against hand computations, its layouts'
one-line errors, the plan against what a training step holds and allocates, and
`moe-train info --plan`."""

import json
import subprocess
import sys
from pathlib import Path

import moe_data
import moe_models
import pytest
import torch
from moe_train import memory
from moe_train.config import TrainConfig, resolve
from moe_train.errors import CLIError
from moe_train.memory import Layout

PROBE = Path(__file__).with_name("memory_probe.py")

# two layers, the second a 4-expert GShard layer: small enough to count by hand
SMALL = dict(
    d_model=32, n_layers=2, n_heads=2, seq_len=16, d_ff=64, n_experts=4, expert_size=16, dropout=0.0
)


def small():
    return moe_models.get_config("tiny-gshard", **SMALL)


def test_one_process_holds_every_parameter_four_times_over():
    cfg = small()
    p = memory.plan(cfg, TrainConfig(), micro_batch=2)
    total = sum(t.numel() for t in moe_models.build(cfg).parameters())
    assert p.parameters_total == p.held == total == 25376
    assert (p.parameters, p.gradients, p.optimizer, p.gathered) == (
        4 * total,
        4 * total,
        8 * total,
        0,
    )


def test_sharded_parameters_and_gathered_copies_by_hand():
    """dp_shard=4 x ep=2: dense tensors by 4 rows (rounded up), experts cut into 2 slices of 2
    whole experts and each slice by 2; bf16 copies gathered, fp32 reduction."""
    layout = Layout(world_size=4, dp_shard=4, ep=2, param_dtype="bf16", reduce_dtype="fp32")
    p = memory.plan(small(), TrainConfig(), 2, layout)
    # root: embedding 256/4 rows x 32, final norm 2 x 32/4
    root = 64 * 32 + 2 * 8
    # attention block: 2 norms x 8, qkv 24 x 32 + 24, out 8 x 32 + 8
    attn = 16 + 24 * 32 + 24 + 8 * 32 + 8
    dense_ffn = 16 + 16 * 32 + 16 + 8 * 64 + 8  # ffn norm, fc1 64/4 rows, fc2 32/4 rows
    moe_ffn = 16 + 1 * 32 * 16 * 2 + 1 * 32  # w1, w2: 1 expert of 4; router gate 4/4 rows
    assert p.held == root + attn + dense_ffn + attn + moe_ffn == 25376 // 4
    assert (p.parameters, p.gradients, p.optimizer) == (4 * p.held, 4 * p.held, 8 * p.held)
    # unsharded: root 8192 + 64; block 0 8544; block 1 8576 with its 4096 expert parameters at
    # half (ep=2): 6528. bf16 copies of the root and both blocks (the one computing and the
    # next), and block 0's gradients in bf16 and fp32
    assert p.gathered == 2 * (8256 + 8544 + 6528) + (2 + 4) * 8544


def test_the_build_holds_shards_on_the_device_and_the_whole_model_on_one_host():
    """One process: the model it builds is the one it trains. Past one process the device holds
    its fp32 shards and one whole tensor at a time (the largest: the 256 x 32 embedding), and
    the whole fp32 model is built on rank 0's host alone."""
    one = memory.plan(small(), TrainConfig(), 2)
    assert one.build == one.parameters <= one.peak == one.total
    assert one.host == 4 * 25376
    sharded = memory.plan(small(), TrainConfig(), 2, Layout(world_size=4, dp_shard=4, ep=2))
    assert sharded.largest == 256 * 32
    assert sharded.build == 4 * (25376 // 4) + 4 * 256 * 32
    assert sharded.peak == sharded.total and sharded.host == one.host


def test_the_host_check_is_rank_0s_of_a_fresh_run(monkeypatch):
    """Past one process on the CPU rank 0 needs the whole fp32 model beside its own peak; the
    other ranks, and a resumed run (its weights come from the checkpoint), check their device
    alone; one process on the CPU trains the model it builds (the device check counts it)."""
    cfg, train, cpu = small(), TrainConfig(), torch.device("cpu")
    p = memory.plan(cfg, train, 2, Layout.from_train(train, 2))
    monkeypatch.setattr(memory, "device_available", lambda device: 2**40)
    monkeypatch.setattr(memory, "host_available", lambda: p.host + p.peak - 1)
    with pytest.raises(CLIError, match="need 0.0 GiB of host memory to be built on rank 0") as e:
        memory.preflight(cfg, train, 2, cpu, world_size=2)
    assert "\n" not in str(e.value) and "skip_memory_check" in str(e.value)
    memory.preflight(cfg, train, 2, cpu, world_size=2, rank=1)
    memory.preflight(cfg, train, 2, cpu, world_size=2, fresh=False)
    memory.preflight(cfg, train, 2, cpu)
    monkeypatch.setattr(memory, "host_available", lambda: p.host + p.peak)
    memory.preflight(cfg, train, 2, cpu, world_size=2)


def test_activations_by_hand():
    """Per token, in elements (d = i = 32, no dropout). Layer 0, dense FFN, w = 4192 / 64:
    A = 4d + 5i + 2w = 419, S = 2d + 3i + w + d = 257.5, backward workspace 2w = 131. Layer 1,
    GShard (no hidden rows saved), w = 2176 / 64 = 34, k d = 34 * 32 / 16 = 68: A = 4d + 5i =
    288, plus under ep=2 the received tokens k d = 68; S = 2d + 3i + E = 164; workspace 6w +
    3kd = 408. K = d per layer, head 3d = 96; bf16: 2 bytes each, plus 12 V = 3072 bytes of
    fp32 logits; 2 x 16 tokens."""
    cfg, train = small(), TrainConfig(precision="bf16")
    layout = Layout(world_size=2, dp_shard=2, ep=2)

    def act(mode):
        from dataclasses import replace

        return memory.activations(cfg, train, 2, replace(layout, activation_checkpointing=mode))

    assert act("none") == 32 * (2 * (419 + 356 + 408 + 96) + 3072)
    assert act("full") == 32 * (2 * (32 + 32 + 356 + 408 + 96) + 3072)
    selective = 257.5 + 164 + max(419 - 257.5 + 131, 356 - 164 + 408)
    assert act("selective") == 32 * (2 * (selective + 96) + 3072)
    assert act("none") > act("selective") > act("full")
    fp32 = memory.activations(cfg, TrainConfig(), 2, Layout(world_size=1))
    assert fp32 == 32 * (4 * (419 + 288 + 408 + 96) + 3072)  # no EP: no received tokens
    # FSDP2's bf16 param_dtype: 16-bit activations; one process runs without FSDP2
    sharded = Layout(world_size=2, dp_shard=2, param_dtype="bf16")
    assert memory.activations(cfg, TrainConfig(), 2, sharded) == 32 * (2 * 1211 + 3072)
    single = Layout(world_size=1, param_dtype="bf16")
    assert memory.activations(cfg, TrainConfig(), 2, single) == fp32


def test_sharding_divides_the_states_and_reshard_bounds_the_gathered_copies():
    cfg = moe_models.get_config("artetxe-moe-15b")
    train = TrainConfig()
    one = memory.plan(cfg, train, 1)
    eight = memory.plan(cfg, train, 1, Layout(world_size=8, dp_shard=8, ep=8))
    assert one.states / 8 <= eight.states <= one.states / 8 * 1.001
    assert eight.activations > one.activations  # the received tokens under EP
    keep = memory.plan(
        cfg, train, 1, Layout(world_size=8, dp_shard=8, ep=8, reshard_after_forward=False)
    )
    no_ep = memory.plan(cfg, train, 1, Layout(world_size=8, dp_shard=8))
    assert keep.gathered > eight.gathered and no_ep.gathered > eight.gathered
    hsdp = memory.plan(cfg, train, 1, Layout(world_size=16, dp_replicate=2, dp_shard=8, ep=8))
    assert hsdp.states == eight.states  # replicas shard nothing


@pytest.mark.parametrize(
    ("keys", "world", "words"),
    [
        (dict(dp_replicate=3), 4, ["train.dp_replicate=3", "world size 4"]),
        (dict(dp_shard=3), 4, ["train.dp_shard=3", "world size is 4"]),
        (dict(ep=3), 4, ["train.ep=3", "train.dp_shard=4"]),
    ],
)
def test_layouts_that_do_not_fit_the_world_size_are_one_line_errors(keys, world, words):
    with pytest.raises(CLIError) as e:
        Layout.from_train(TrainConfig(**keys), world)
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_the_layout_of_the_train_keys():
    train = TrainConfig(dp_replicate=2, ep=2, param_dtype="bf16", activation_checkpointing="full")
    assert Layout.from_train(train, 8) == Layout(
        world_size=8,
        dp_replicate=2,
        dp_shard=4,
        ep=2,
        param_dtype="bf16",
        activation_checkpointing="full",
    )
    # train.expert_parallel: the experts over every dp_shard rank
    assert Layout.from_train(TrainConfig(expert_parallel=True), 4).ep == 4


def test_ep_must_divide_the_experts():
    with pytest.raises(CLIError, match=r"train.ep=8 must divide the number of experts \(4"):
        memory.plan(small(), TrainConfig(), 1, Layout(world_size=8, dp_shard=8, ep=8))


@pytest.mark.parametrize("nproc", [1, 2])
def test_the_plan_matches_what_a_training_step_holds(tmp_path, nproc):
    """tiny-gshard trains for two steps (memory_probe.py) on one process, or two under torchrun
    (gloo) with train.dp_shard=2: the plan's weights, gradients and AdamW state equal the bytes
    of the tensors rank 0 holds (its shards: the largest; AdamW's step counters aside), and its
    gradients + FSDP2 copies + activations are within 20% of the peak each rank's CPU allocator
    reached in the second step's forward and backward, as the torch profiler counted it."""
    micro = 8
    argv = ["train", "--preset", "tiny-gshard", "--out", tmp_path / "run", "--max-steps", "2"]
    argv += ["--batch-size", micro * nproc, "--no-progress", "--no-tensorboard"]
    argv += ["train.final_eval_batches=1", "train.eval_batch_size=2", f"train.dp_shard={nproc}"]
    out = tmp_path / "probe"
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    run = subprocess.run(
        [*launch, PROBE, out, "--", *map(str, argv)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    cfg = resolve(preset="tiny-gshard", overrides=[f"train.dp_shard={nproc}"])
    model = moe_models.get_config(cfg.model, vocab_size=moe_data.default_corpus().vocab_size)
    p = memory.plan(model, cfg.train, micro, Layout.from_train(cfg.train, nproc))
    for rank in range(nproc):
        held = json.loads(Path(f"{out}.rank{rank}").read_text())
        if rank == 0:
            assert held["parameters"] == p.parameters and held["gradients"] == p.gradients
        assert 0.99 * p.parameters <= held["parameters"] <= p.parameters
        assert 0 <= held["optimizer"] - 2 * held["parameters"] <= 4 * 64  # fp32 step counts
        transient = p.gradients + p.gathered + p.activations
        assert 0.8 <= transient / held["peak"] <= 1.2, (rank, transient, held["peak"])


def test_info_plan_prints_each_part_and_whether_it_fits(cli):
    rc, out, err = cli("info", "tiny-gshard", "--plan", "--gpu-mem", "1", "train.batch_size=4")
    assert rc == 0, err
    cfg = resolve(preset="tiny-gshard", overrides=["train.batch_size=4"])
    p = memory.plan(cfg.model, cfg.train, 4)
    lines = out.splitlines()
    assert "tiny-gshard on 1 rank: dp_replicate=1 dp_shard=1 ep=1" in lines[0]
    assert "micro-batch 4 x seq_len 64" in lines[1]
    rows = {name: float(gib) for name, gib in (line.rsplit(None, 1) for line in lines[3:-1])}
    assert rows["weights (fp32 shards)"] == round(p.parameters / 2**30, 2)
    assert rows["activations (32-bit)"] == round(p.activations / 2**30, 2)
    assert rows["total"] == round(p.total / 2**30, 2)
    assert rows["whole fp32 model, rank 0's host"] == round(4 * p.parameters_total / 2**30, 2)
    assert lines[-1].startswith("fits in 1 GiB")
    rc, out, _ = cli("info", "--preset", "tiny-gshard", "--plan", "--gpu-mem", "0.001")
    assert rc == 0 and out.splitlines()[-1].startswith("does not fit in 0.001 GiB")


def test_info_plan_of_a_sharded_layout_sums_to_its_total(cli):
    rc, out, err = cli("info", "artetxe-moe-15b", "--plan", "--nproc", "8", "train.batch_size=8")
    assert rc == 0, err
    lines = out.splitlines()
    assert "dp_shard=8" in lines[0] and "micro-batch 1" in lines[1]
    gib = [float(line.rsplit(None, 1)[1]) for line in lines[3:-1]]
    assert abs(sum(gib[:-2]) - gib[-2]) < 0.05  # the parts add up to the total
    assert "in 80 GiB" in lines[-1]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--plan", "--nproc", "0"], ["--nproc", "positive integer"]),
        (["--plan", "--gpu-mem", "nan"], ["--gpu-mem", "finite number"]),
        (["--plan", "--nproc", "3"], ["train.batch_size=16", "--nproc 3"]),
        (["--nproc", "2"], ["--nproc", "--plan"]),
        (["--plan", "--preset", "tiny-dense"], ["two presets", "tiny-dense"]),
        (["--plan", "--nproc", "2", "train.grad_accum=3"], ["train.batch_size=16", "grad_accum 3"]),
        (["--plan", "n_layers=0"], ["n_layers"]),
    ],
)
def test_info_plan_bad_values_are_one_line_errors(cli, argv, words):
    rc, _, err = cli("info", "tiny-gshard", *argv)
    cli.assert_one_line_error(rc, err, *words)
    assert rc == 2
