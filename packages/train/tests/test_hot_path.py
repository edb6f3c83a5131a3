"""The training step's host reads and `--compile`.

A training step (`Trainer.train_step`) reads nothing back from the device but what the model
itself reads (on CPU tensors its token range check, asynchronous on CUDA; moe_models'
test_host_reads): the losses stay on the device until logging steps. The optimiser's step
counters are read too, but AdamW keeps them on the host on CUDA as well, so those reads wait for
nothing and are left out.

`--compile` (train.compile) trains, logs and resumes like an eager run, and writes checkpoints an
uncompiled model loads.
"""

import math

import moe_models
import pytest
import torch
from moe_layers.testing import HostReads
from moe_train import checkpoint as ckpt
from moe_train.config import resolve
from moe_train.trainer import Trainer, TrainOptions

SCALAR = "aten._local_scalar_dense.default"


class StepReads(HostReads):
    """HostReads leaving out the reads of `host_tensors` (tensors kept on the host on CUDA)."""

    def __init__(self, host_tensors):
        super().__init__(into_ops=False)
        self.host_tensors = host_tensors
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and any(
            args[0] is t for t in self.host_tensors
        ):
            self.host_reads += 1
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.parametrize("preset, grad_accum", [("tiny-sigma-moe", 1), ("tiny-gshard", 2)])
def test_train_step_reads_only_what_the_model_reads(cli, tmp_path, preset, grad_accum):
    overrides = [*cli.tiny_model(preset), "train.batch_size=4", f"train.grad_accum={grad_accum}"]
    cfg = resolve(preset=preset, overrides=overrides)
    trainer = Trainer(
        cfg, TrainOptions(out_dir=tmp_path / "run", progress=False, tensorboard=False)
    )
    try:
        trainer.model.train()
        trainer.train_step()  # creates the optimiser state
        steps = [s["step"] for s in trainer.optimizer.state.values()]
        assert steps and all(t.device.type == "cpu" for t in steps)
        with StepReads(steps) as reads:
            for _ in range(2):
                lm, aux = trainer.train_step()
        assert reads.ops == [SCALAR, SCALAR] * (2 * grad_accum)
        assert reads.host_reads == 2 * len(steps)
        assert isinstance(lm, torch.Tensor) and all(
            isinstance(v, torch.Tensor) for v in aux.values()
        )
    finally:
        trainer.close()


@pytest.fixture
def aot_eager(monkeypatch):
    """`train.compile` with the aot_eager backend: the trainer's wiring is under test here (the
    models' compiled numerics are moe_models' test_compile, inductor's code generation would
    take minutes on a small CI machine)."""
    compile_module, compiled = torch.nn.Module.compile, []

    def compile_with_aot_eager(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        compile_module(self, *args, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_with_aot_eager)
    return compiled


def test_compiled_training_matches_eager_resumes_and_saves_plain_checkpoints(
    cli, tmp_path, aot_eager
):
    """Without dropout, so that the compiled run draws no random numbers the eager one does
    not; the Transformer-XL memory is carried, so a resumed run starts with a state."""
    common = ["--max-steps", "4", "dropout=0.0", "train.save_interval=2"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert cli.train(eager, *common)[0] == 0
    rc, out, err = cli.train(compiled, *common, "--compile", "--stop-at", "2")
    assert rc == 0, err
    assert "--resume" in out and max(cli.losses(compiled)) == 2
    rc, _, err = cli("train", "--out", compiled, "--resume", "--no-progress", "--no-tensorboard")
    assert rc == 0, err
    got, want = cli.losses(compiled), cli.losses(eager)
    assert sorted(got) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in got.values())
    assert got == pytest.approx(want, rel=1e-4)
    # compiled per block (the tiny model has one), in the run and in its resumption
    assert aot_eager == ["XLLayer", "XLLayer"]
    payload = ckpt.load_newest(compiled)
    assert payload["run_config"]["train"]["compile"] is True
    assert not any("_orig_mod" in key for key in payload["model"])
    model = moe_models.build(moe_models.config_from_dict(payload["run_config"]["model"]))
    model.load_state_dict(payload["model"])


def test_a_failing_compile_is_one_line_naming_the_flag(cli, tmp_path, monkeypatch):
    """torch.compile failing (here a backend that raises, as inductor does without a C compiler)
    ends as one error line and exit code 2, not as the traceback of a bug."""

    def failing_backend(gm, example_inputs):
        raise RuntimeError("no C compiler found")

    def compile_failing(self, *args, **kwargs):
        compile_module(self, *args, backend=failing_backend, **kwargs)

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", compile_failing)
    rc, _, err = cli.train(tmp_path / "run", "--max-steps", "2", "--compile")
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith("error: torch.compile failed: ")
    assert "no C compiler found" in err and "(run without --compile)" in err
    assert "Traceback" not in err
