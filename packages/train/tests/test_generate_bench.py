"""`moe-train generate --bench` and moe_train.generation_speed: what is timed and reported."""

import moe_models
import pytest
import torch
from moe_train import generation_speed
from moe_train.generation_speed import GenerationSpeed, floor_matrices, measure


def test_the_floor_matrices_hold_the_active_values_in_whole_columns(monkeypatch):
    monkeypatch.setattr(generation_speed, "FLOOR_CHUNK", 64)
    for n, d in [(1, 4), (7, 4), (64, 4), (100, 4), (3 * 64 + 5, 8)]:
        mats = floor_matrices(n, d, torch.float32, "cpu")
        columns = -(-n // d)
        assert sum(m.numel() for m in mats) == columns * d
        assert all(m.shape[0] == d and m.numel() <= 64 for m in mats)
        assert len(mats) == -(-columns // (64 // d))


def test_speeds_are_the_timings_turned_into_rates():
    s = GenerationSpeed(
        batch=8,
        prompt_len=32,
        new_tokens=4,
        prefill_s=0.5,
        decode_step_s=0.02,
        floor_s=0.004,
        weight_bytes=4_000_000,
    )
    assert s.prefill_tokens_per_s == pytest.approx(512)
    assert s.decode_tokens_per_s == pytest.approx(400)
    assert s.step_over_floor == pytest.approx(5)
    assert s.bandwidth_bytes_per_s == pytest.approx(1e9)


def test_measure_times_each_model_and_counts_its_active_weights():
    models = {}
    for name in ("tiny-sigma-moe", "tiny-dense"):
        torch.manual_seed(0)
        models[name] = moe_models.build(moe_models.get_config(name, n_layers=1, seq_len=8))
    got = measure(models, batch=2, prompt_len=3, new_tokens=2, repeats=1, warmup=0)
    assert set(got) == set(models)
    for name, speed in got.items():
        active = moe_models.count_parameters(models[name].config)["active"]
        assert speed.weight_bytes == 4 * active
        assert speed.prefill_s > 0 and speed.decode_step_s > 0 and speed.floor_s > 0
        assert (speed.batch, speed.prompt_len, speed.new_tokens) == (2, 3, 2)
    with pytest.raises(ValueError):
        measure(models, new_tokens=0)


def test_generate_bench_on_a_preset_reports_prefill_decode_and_the_bound(cli):
    rc, out, err = cli(
        "generate", "--bench", "--preset", "tiny-dense", "--max-new-tokens", "2",
        "--prompt-len", "3", "--batch-size", "2", "--repeats", "1", "--threads", "1",
        "--device", "cpu",
    )  # fmt: skip
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("tiny-dense (random weights): batch 2, 3-token prompts, 2 new")
    assert [line.split()[0] for line in lines[1:4]] == ["prefill", "decode", "bound"]
    active = moe_models.count_parameters(moe_models.get_config("tiny-dense"))["active"]
    assert f"{active:,} active parameters" in lines[3]
    assert lines[4].startswith("decode step / bound") and lines[4].endswith("x")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "--bench"], "give one of them"),
        (["generate", "RUN", "--bench", "--preset", "tiny-dense"], "give one of them"),
        (["generate", "--bench", "--preset", "tiny-dense", "--max-new-tokens", "0"], ">= 1"),
        (["generate", "RUN", "--prompt", "a", "--batch-size", "2"], "--batch-size is an option"),
        (["generate", "RUN", "--prompt", "a", "--preset", "tiny-dense"], "--preset is an option"),
        (["generate", "RUN"], "--prompt is required"),
        (["generate", "--prompt", "a"], "give a run directory"),
    ],
)
def test_generate_bench_mistakes_are_one_line_errors(cli, argv, needle):
    rc, _, err = cli(*argv)
    cli.assert_one_line_error(rc, err, needle)
