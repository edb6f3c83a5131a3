"""torchrun with 2 and 4 gloo processes: every layout against one process, the model built
shard by shard with the 1-process weights, a checkpoint that reshards from 4 ranks to 2 to 1 and back, a rank killed in the middle of a save."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from moe_train import checkpoint as ckpt

HERE = Path(__file__).parent
# what layout_worker.py checks: preset -> number of 4-rank layouts
LAYOUTS_CHECKED = {
    **dict.fromkeys(["tiny-sigma-moe", "tiny-switch", "tiny-gshard", "tiny-base"], 4),
    **dict.fromkeys(["tiny-sbase", "tiny-moeut"], 4),
    **dict.fromkeys(["tiny-hash", "tiny-smlp"], 2),
}


def torchrun(nproc: int, *argv, env=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("MOE_TRAIN_DEBUG", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*launcher, "--nproc_per_node", str(nproc), *(str(a) for a in argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow
def test_every_4_rank_layout_matches_one_process_and_shards_the_state():
    """dp_shard=4, dp_shard=4 with ep=2, dp_replicate=2 x dp_shard=2 with ep=2, and ep=4, for
    tiny-sigma-moe, tiny-switch (tokens dropped), tiny-gshard, tiny-base, tiny-sbase and
    tiny-moeut (one layer shared by two applications), and the two with ep=2 for tiny-hash and
    tiny-smlp (tMoE): losses and updated weights of two steps equal the 1-process run's (fp64;
    tolerances in layout_worker.py), and a rank at dp_shard=4 holds at most 30% of the
    parameter, gradient and AdamW bytes."""
    done = torchrun(4, HERE / "layout_worker.py")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "per-rank state bytes" in done.stderr
    for preset, layouts in LAYOUTS_CHECKED.items():
        assert f"{preset}: {layouts} layouts match one process" in done.stderr, preset


@pytest.mark.slow
def test_every_rank_builds_only_its_shards_with_the_one_process_weights():
    """build_model on 4 ranks (dp_shard=4; ep=2; dp_replicate=2 x dp_shard=2 with ep=2; ep=4):
    every parameter and buffer equals the 1-process build's, a buffer no state dict carries
    included; only rank 0's memory grows by the whole model (build_worker.py)."""
    done = torchrun(4, HERE / "build_worker.py")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "rank 1: resident memory grew" in done.stderr


@pytest.mark.slow
def test_a_checkpoint_reshards_4_to_2_to_1_and_back_and_survives_a_kill_mid_save(cli, tmp_path):
    preset = "tiny-gshard"
    model = [*cli.tiny_model(preset), "dropout=0"]
    args = [*cli.TINY_TRAIN, *model, "--device", "cpu", "train.save_interval=2"]
    quiet = ["--no-progress", "--no-tensorboard", "--device", "cpu"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    rc, _, err = cli("train", "--preset", preset, "--out", straight, "--max-steps", "8", *args)
    assert rc == 0, err
    module = ["-m", "moe_train.cli", "train", "--out", run]
    # 4 ranks, experts over 2 of them: steps 1-2
    first = torchrun(4, *module, "--preset", preset, "--max-steps", "8", "--stop-at", "2", *args,
                     "train.ep=2")  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    assert "dp_shard=4, ep=2" in first.stdout
    # 2 ranks: steps 3-4 saved, then rank 1 is killed while writing step 6
    second = torchrun(2, HERE / "kill_worker.py", "train", "--out", run, "--resume", *quiet,
                      "--stop-at", "6", env={"KILL_AT_STEP": "6"})  # fmt: skip
    assert second.returncode != 0
    assert "written by 4 rank(s), resuming on 2" in second.stderr
    assert ckpt.latest(run).name == "step-00000004"
    assert ckpt.load(run, tensors=False)["world_size"] == 2
    # 1 process from the 2 ranks' step 4: steps 5-6, the saved ep=2 giving way (no key needed)
    rc, _, err = cli("train", "--out", run, "--resume", "--stop-at", "6", *quiet)
    assert rc == 0, err
    assert "written by 2 rank(s), resuming on 1" in err
    assert "note: the checkpoint's train.ep=2 does not fit 1 process(es)" in err
    # and back to 4 ranks with ep=2: steps 7-8
    last = torchrun(4, *module, "--resume", *quiet, "train.ep=2")
    assert last.returncode == 0, last.stderr[-3000:]
    one, split = cli.losses(straight), cli.losses(run)
    assert sorted(split) == list(range(1, 9))
    for step in one:
        assert split[step] == pytest.approx(one[step], rel=1e-5), step
    assert not list((run / "checkpoints").glob(ckpt.TMP_PREFIX + "*"))


@pytest.mark.slow
def test_compile_with_fsdp2_and_expert_parallelism_gives_the_eager_losses(cli, tmp_path):
    """--compile on 2 ranks with the experts sharded over both (dp_shard=2, ep=2; compiled per
    block with aot_eager: compile_worker.py) trains to the losses of the eager 1-process run
    (rel 1e-5). Without the σ-MoE entropy regulariser, which is computed per rank."""
    model = [*cli.tiny_model("tiny-sigma-moe"), "n_layers=2", "dropout=0", "ffn.entropy_weight=0"]
    args = [*cli.TINY_TRAIN, *model, "--device", "cpu", "--max-steps", "3"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    rc, _, err = cli("train", "--preset", "tiny-sigma-moe", "--out", eager, *args)
    assert rc == 0, err
    run = torchrun(2, HERE / "compile_worker.py", "train", "--preset", "tiny-sigma-moe",
                   "--out", compiled, *args, "--compile", "train.ep=2")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "dp_shard=2, ep=2" in run.stdout
    assert run.stderr.count("rank compiled 2 modules: XLLayer, XLLayer") == 2
    got, want = cli.losses(compiled), cli.losses(eager)
    assert sorted(got) == [1, 2, 3]
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_fp16_grad_scaler_skips_the_same_steps_on_every_rank():
    """The grad scaler of a torchrun run (ShardedGradScaler) under FSDP2 with ep=2: an overflow in
    one rank's expert shard makes every rank skip that step and halve the scale; losses and
    weights equal the 1-process GradScaler run's (fp64; under fp16 autocast the losses within
    rtol 2e-3); the scaler state is every rank's and loads again (scaler_worker.py)."""
    done = torchrun(2, HERE / "scaler_worker.py")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "step 2 skipped" in done.stdout
