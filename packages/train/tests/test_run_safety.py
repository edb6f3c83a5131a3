"""What protects a run: the folder lock, history kept apart (--overwrite), disk-full saves, resuming
from the newest checkpoint that loads, exact resumption of metrics.jsonl, the non-finite check,
the memory preflight, and bugs told apart from user errors."""

import errno
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moe_kernels.testing import HostReads
from moe_train import checkpoint as ckpt
from moe_train import memory, rundir
from moe_train.distributed import DistEnv
from moe_train.loop import NonFinite
from moe_train.trainer import Trainer

POISON = Path(__file__).with_name("poison_plugin.py")
WALL_CLOCK = ("tokens_per_s",)


def without_wall_clock(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in records]


def test_a_stale_lock_is_taken_over_and_a_finished_run_leaves_no_lock(cli, tmp_path):
    run = tmp_path / "run"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run.mkdir()
    holder = {"pid": gone.pid, "host": __import__("socket").gethostname()}
    (run / rundir.LOCK).write_text(json.dumps(holder))
    rc, _, err = cli.train(run, "--max-steps", "2")
    assert rc == 0, err
    assert f"stale lock {run / rundir.LOCK}" in err and str(gone.pid) in err
    assert not (run / rundir.LOCK).exists()


def test_a_lock_is_held_while_the_run_lives_and_refuses_a_second_one(cli, tmp_path, monkeypatch):
    run = tmp_path / "run"
    seen = {}
    real_step = Trainer.train_step

    def step_and_try_a_second_run(self):
        if self.step == 1 and not seen:
            seen["lock"] = json.loads((run / rundir.LOCK).read_text())
            seen["second"] = cli.train(run, "--max-steps", "2")
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_and_try_a_second_run)
    rc, _, err = cli.train(run, "--max-steps", "3")
    assert rc == 0, err
    assert seen["lock"]["pid"] == __import__("os").getpid()
    rc2, _, err2 = seen["second"]
    cli.assert_one_line_error(rc2, err2, "in use by a live run", str(run / rundir.LOCK))
    assert sorted(cli.losses(run)) == [1, 2, 3]


def test_overwrite_deletes_the_earlier_history_first(cli, tmp_path):
    run = tmp_path / "run"
    assert cli.train(run, "--max-steps", "4", "train.save_interval=2")[0] == 0
    (run / "notes.txt").write_text("mine\n")
    rc, _, err = cli.train(run, "--max-steps", "2", "--overwrite")
    assert rc == 0, err
    assert "--overwrite: deleted" in err and "checkpoints/" in err
    assert sorted(cli.losses(run)) == [1, 2]
    assert [p.name for _, p in ckpt.step_files(run / "checkpoints")] == ["step-00000002"]
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 2
    assert (run / "notes.txt").read_text() == "mine\n"


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_earlier_checkpoints(
    cli, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    opened = []
    real_fdopen = ckpt.os.fdopen

    class FullDisk:
        """The second checkpoint's first file fills the disk after its first kilobyte."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            # the first checkpoint writes two files (its meta and the rank's own part)
            if len(opened) > 2 and self.f.tell() + len(data) > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, mode, *args):
        if mode != "wb":  # not a checkpoint (the lock file)
            return real_fdopen(fd, mode, *args)
        opened.append(fd)
        return FullDisk(real_fdopen(fd, mode, *args))

    monkeypatch.setattr(ckpt.os, "fdopen", fdopen)
    rc, _, err = cli.train(run, "--max-steps", "6", "train.save_interval=2", "train.keep_last=1")
    cli.assert_one_line_error(rc, err, "No space left on device", "step-00000004", "intact")
    assert rc == 2
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert files == ["step-00000002"]
    assert ckpt.load(run)["step"] == 2
    monkeypatch.undo()
    rc, _, err = cli("train", "--out", run, "--resume", "--no-progress", "--no-tensorboard")
    assert rc == 0, err
    assert sorted(cli.losses(run)) == list(range(1, 7))


def test_resume_skips_a_truncated_newest_checkpoint(cli, tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "run"
    common = ["--max-steps", "6", "train.save_interval=2", "dropout=0.1"]
    assert cli.train(straight, *common)[0] == 0
    assert cli.train(run, *common, "--stop-at", "4")[0] == 0
    newest = run / "checkpoints" / "step-00000004"
    meta = newest / ckpt.META
    meta.write_bytes(meta.read_bytes()[:1000])
    rc, _, err = cli("train", "--out", run, "--resume", "--no-progress", "--no-tensorboard")
    assert rc == 0, err
    note = [line for line in err.splitlines() if line.startswith("note: --resume skips")]
    assert len(note) == 1 and str(newest) in note[0] and "corrupt or truncated" in note[0]
    assert (run / "checkpoints" / "step-00000004.unreadable").exists()
    assert cli.losses(run) == cli.losses(straight)


@pytest.mark.parametrize(
    "preset, interrupt",
    [("tiny-sigma-moe", "stop-at"), ("tiny-gshard", "sigterm"), ("tiny-switch", "stop-at")],
)
def test_an_interrupted_run_writes_the_same_metrics_as_an_uninterrupted_one(
    cli, tmp_path, monkeypatch, preset, interrupt
):
    # windows of 4 steps for losses and routing, cut at step 6 by the interruption
    common = ["--max-steps", "12", "train.log_interval=4", "train.routing_interval=4"]
    common += ["train.save_interval=5", "--eval-interval", "8", "dropout=0.1"]
    common += ["n_layers=2"] if preset == "tiny-gshard" else []
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli.train(straight, *common, preset=preset)[0] == 0
    if interrupt == "stop-at":
        rc, out, err = cli.train(split, *common, "--stop-at", "6", preset=preset)
    else:
        real_step = Trainer.train_step

        def step(self):
            result = real_step(self)
            if self.step == 5:  # the sixth step: the loop stops after it
                signal.raise_signal(signal.SIGTERM)
            return result

        with monkeypatch.context() as m:
            m.setattr(Trainer, "train_step", step)
            rc, out, err = cli.train(split, *common, preset=preset)
    assert rc == 0, err
    assert "stopped at step 6" in out
    assert ckpt.load(split)["step"] == 6
    rc, _, err = cli("train", "--out", split, "--resume", "--no-progress", "--no-tensorboard")
    assert rc == 0, err
    expected = without_wall_clock(cli.metrics(straight))
    assert any("routing" in r for r in expected) and any("valid_loss" in r for r in expected)
    assert without_wall_clock(cli.metrics(split)) == expected


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_a_non_finite_step_stops_the_run_before_anything_of_it_is_saved(cli, tmp_path, poison):
    run = tmp_path / "run"
    argv = ["--plugin", POISON, "ffn=poison", "ffn.at_call=3", f"ffn.poison={poison}"]
    argv += ["--max-steps", "8", "train.save_interval=2", "train.log_interval=2"]
    rc, _, err = cli.train(run, *argv, preset="tiny-dense")
    good = run / "checkpoints" / "step-00000002"
    cli.assert_one_line_error(rc, err, "not finite at step 3", "found at step 4", str(good))
    assert rc == 2
    assert [p.name for _, p in ckpt.step_files(run / "checkpoints")] == [good.name]
    payload = ckpt.load(good)
    assert all(torch.isfinite(t).all() for t in payload["model"].values())
    assert [r["step"] for r in cli.metrics(run)] == [2]


@pytest.mark.gpu
def test_fp16_steps_the_grad_scaler_skips_are_no_error(cli, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("fp16 training needs CUDA")
    argv = ["--plugin", POISON, "ffn=poison", "ffn.at_call=2", "ffn.poison=grad_once"]
    argv += ["--max-steps", "4", "--precision", "fp16", "--device", "cuda"]
    rc, _, err = cli.train(tmp_path / "run", *argv, preset="tiny-dense")
    assert rc == 0, err
    assert sorted(cli.losses(tmp_path / "run")) == [1, 2, 3, 4]


def test_the_non_finite_watch_keeps_the_first_step_and_reads_nothing_on_the_way():
    watch = NonFinite("cpu")
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with HostReads() as reads:
        watch.update(1, torch.tensor(2.0), torch.tensor(0.5))
        watch.update(2, torch.tensor(float("inf")), torch.tensor(0.5))
        watch.update(3, torch.tensor(1.0), torch.tensor(float("nan")))
    assert not reads.ops, reads.ops
    assert watch.read(env) == 2
    assert NonFinite("cpu").read(env) is None


def test_the_memory_preflight_refuses_before_building_the_model(cli, tmp_path, monkeypatch):
    import moe_models

    monkeypatch.setattr(memory, "host_available", lambda: 1000 * 2**20)
    built = []
    real_build = moe_models.build

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        # the plan builds the model on the meta device, which allocates nothing
        built.extend(p.device for p in model.parameters() if not p.is_meta)
        return model

    monkeypatch.setattr(moe_models, "build", build)
    rc, _, err = cli.train(tmp_path / "r", "--max-steps", "1", "d_model=2048", "n_layers=8")
    cli.assert_one_line_error(rc, err, "needs about", "1.0 GiB is available", "skip_memory_check")
    assert rc == 2 and not built
    rc, _, err = cli.train(tmp_path / "r2", "--max-steps", "1", "train.skip_memory_check=true")
    assert rc == 0, err


def test_a_bug_is_a_traceback_with_exit_code_1_and_debug_shows_user_errors(cli, monkeypatch):
    import moe_models

    def broken(cfg):
        raise ZeroDivisionError("a bug")

    with monkeypatch.context() as m:
        m.setattr(moe_models, "flops_per_token", broken)
        rc, _, err = cli("info", "--preset", "tiny-dense")
    assert rc == 1
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err
    assert err.strip().splitlines()[-1].startswith("error: internal error")
    monkeypatch.setenv("MOE_TRAIN_DEBUG", "1")
    from moe_train.errors import CLIError

    with pytest.raises(CLIError, match="nope"):
        cli("info", "--preset", "nope")


def test_an_unwritable_out_folder_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)
    rc, _, err = cli.train(tmp_path / "r", "--max-steps", "1")
    cli.assert_one_line_error(rc, err, str(tmp_path / "r"), "not writable")


def test_a_warmup_longer_than_the_run_is_allowed_with_a_note(cli, tmp_path):
    rc, _, err = cli.train(tmp_path / "r", "--max-steps", "2", "train.warmup_steps=5")
    assert rc == 0, err
    assert "note: train.warmup_steps=5 exceeds train.max_steps=2" in err
    rc, _, err = cli(
        "train", "--out", tmp_path / "r", "--resume", "--max-steps", "3", "--no-progress"
    )
    assert rc == 0 and "warmup" not in err, err


def test_the_memory_message_counts_a_small_model_readably(tmp_path, monkeypatch):
    import moe_models
    from moe_train.config import TrainConfig
    from moe_train.errors import CLIError

    monkeypatch.setattr(memory, "host_available", lambda: 1)
    cfg = moe_models.get_config("tiny-dense")
    with pytest.raises(CLIError, match=r"\(\d+\.\d\dK parameters") as info:
        memory.preflight(cfg, TrainConfig(), micro_batch=4096, device=torch.device("cpu"))
    assert "0.00B" not in str(info.value)
