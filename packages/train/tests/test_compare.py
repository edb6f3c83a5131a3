"""`moe-train compare`: tables and plots, resuming after a kill, dense twins, sweep files, the
tables against the runs' own metrics.jsonl, and no matplotlib."""

import csv
import json
import math
import statistics
import sys

import moe_models
import pytest
from moe_train import compare
from moe_train.trainer import Trainer

TINY = ["d_model=32", "n_layers=2", "n_heads=2", "seq_len=16"]
QUICK = [
    "--batch-size",
    "4",
    "--no-progress",
    "--no-tensorboard",
    "train.eval_batches=2",
    "train.final_eval_batches=2",
    "train.eval_batch_size=4",
    "train.warmup_steps=1",
    "train.log_interval=1",
]
PNG = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def final_valid(cli, run_dir) -> float:
    return [r for r in cli.metrics(run_dir) if r.get("final")][-1]["valid_loss"]


def loop_seconds(cli, run_dir, tokens_per_step: int) -> float:
    """The training loop's time as the windows of metrics.jsonl give it."""
    windows = {r["step"]: r["tokens_per_s"] for r in cli.metrics(run_dir) if "train_loss" in r}
    total, previous = 0.0, 0
    for step in sorted(windows):
        total += (step - previous) * tokens_per_step / windows[step]
        previous = step
    return total


class Killed(KeyboardInterrupt):
    """A kill in the middle of a training step (the CLI ends on it as on a second Ctrl-C)."""


def test_compare_writes_tables_and_plots_consistent_with_the_runs_and_resumes_after_a_kill(
    cli, tmp_path, monkeypatch
):
    out = tmp_path / "cmp"
    argv = ["compare", "tiny-sigma-moe", "tiny-gshard", "--max-steps", "3", "--seeds", "2"]
    argv += ["--out", out, *QUICK, *TINY]
    steps_taken, trained = [0], []
    real_step, real_init = Trainer.train_step, Trainer.__init__

    def step(self):
        steps_taken[0] += 1
        if steps_taken[0] == 5:  # step 2 of the second run, after its step-1 checkpoint
            raise Killed
        return real_step(self)

    def init(self, cfg, opts):
        trained.append((opts.out_dir.name, opts.resume))
        real_init(self, cfg, opts)

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(Trainer, "__init__", init)
    rc, _, _ = cli(*argv)
    assert rc == 130
    first_metrics = (out / "runs/tiny-sigma-moe-seed0/metrics.jsonl").read_bytes()
    assert (out / "runs/tiny-sigma-moe-seed0/result.json").is_file()
    assert not (out / "runs/tiny-sigma-moe-seed1/result.json").exists()

    trained.clear()
    rc, stdout, err = cli(*argv)
    assert rc == 0, err
    assert "tiny-sigma-moe-seed0: finished before, skipped" in stdout
    # only the missing runs train; the killed one continues from its checkpoint
    assert trained == [
        ("tiny-sigma-moe-seed1", True),
        ("tiny-gshard-seed0", False),
        ("tiny-gshard-seed1", False),
    ]
    assert (out / "runs/tiny-sigma-moe-seed0/metrics.jsonl").read_bytes() == first_metrics
    assert sorted(cli.losses(out / "runs/tiny-sigma-moe-seed1")) == [1, 2, 3]

    for name in ("valid_vs_steps", "valid_vs_wall_time", "valid_vs_train_flops"):
        assert (out / f"{name}.png").read_bytes().startswith(PNG)
    for name in ("tiny-sigma-moe", "tiny-gshard"):
        assert (out / f"usage_{name}.png").read_bytes().startswith(PNG)

    rows = read_csv(out / "results.csv")
    assert [(r["name"], int(r["seed"])) for r in rows] == [
        ("tiny-sigma-moe", 0),
        ("tiny-sigma-moe", 1),
        ("tiny-gshard", 0),
        ("tiny-gshard", 1),
    ]
    report = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    for row, result in zip(rows, report["runs"], strict=True):
        run_dir = out / "runs" / f"{row['name']}-seed{row['seed']}"
        saved = json.loads((run_dir / "config.json").read_text())
        assert saved["train"]["seed"] == int(row["seed"]) and saved["model"]["d_model"] == 32
        model = moe_models.build(moe_models.config_from_dict(saved["model"]))
        assert int(row["params"]) == sum(p.numel() for p in model.parameters())
        assert float(row["valid_loss"]) == pytest.approx(final_valid(cli, run_dir), rel=1e-12)
        assert float(row["valid_bpc"]) == pytest.approx(float(row["valid_loss"]) / math.log(2))
        wall = loop_seconds(cli, run_dir, 4 * 16)
        assert float(row["wall_s"]) == pytest.approx(wall)
        assert float(row["tokens_per_s"]) == pytest.approx(3 * 4 * 16 / wall)
        flops = moe_models.flops_per_token(model)
        assert int(row["train_flops"]) == 3 * 4 * 16 * flops * 3
        # `moe-train eval` reads the run folder and finds the table's test loss
        eval_out = tmp_path / f"eval-{run_dir.name}.json"
        rc, _, err = cli(
            "eval", run_dir, "--max-batches", "2", "--batch-size", "4", "--out", eval_out
        )
        assert rc == 0, err
        evaluated = json.loads(eval_out.read_text())
        assert float(row["test_loss"]) == pytest.approx(evaluated["test_loss"], rel=1e-5)
        assert result["valid_loss"] == pytest.approx(evaluated["valid_loss"], rel=1e-5)
        last_routing = [r["routing"] for r in cli.metrics(run_dir) if "routing" in r][-1]
        assert {k: v["usage"] for k, v in result["routing"].items()} == {
            k: v["usage"] for k, v in last_routing.items()
        }
    for name in ("tiny-sigma-moe", "tiny-gshard"):
        bpc = [float(r["valid_bpc"]) for r in rows if r["name"] == name]
        shown = f"{statistics.fmean(bpc):.4f} ± {statistics.stdev(bpc):.4f}"
        line = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert shown in line, (shown, line)
    assert "## Routing" in md and "![valid_vs_steps.png](valid_vs_steps.png)" in md


def test_twins_match_parameters_or_compute_within_two_percent():
    spec = compare.build_spec(
        [
            {"name": p, "preset": p, "twins": ["params", "compute"]}
            for p in ("tiny-sigma-moe", "tiny-gshard", "tiny-smlp", "tiny-dense")
        ],
        log=lambda *a: None,
    )
    runs = {r.entry.name: compare.sizes(r.cfg) for r in compare.plan(spec)}
    # a preset without MoE layers has no twin
    assert "tiny-dense~dense-params" not in runs and "tiny-dense" in runs
    for moe in ("tiny-sigma-moe", "tiny-gshard", "tiny-smlp"):
        m, p, c = runs[moe], runs[f"{moe}~dense-params"], runs[f"{moe}~dense-compute"]
        assert p["params"] == p["active_params"] and c["params"] == c["active_params"]
        assert p["params"] == pytest.approx(m["params"], rel=0.02)
        assert c["active_params"] == pytest.approx(m["active_params"], rel=0.02)
        assert c["flops_per_token"] == pytest.approx(m["flops_per_token"], rel=0.02)
        # the MoE is sparse: equal parameters and equal compute are two different models
        assert p["params"] > 1.2 * c["params"]


def test_a_sweep_file_with_names_overrides_twins_and_priming(cli, tmp_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        f"""
max_steps = 5
seeds = [3]
overrides = {json.dumps(TINY)}
task = "default"
k_shot = 1

[[runs]]
preset = "tiny-gshard"
twins = "compute"

[[runs]]
preset = "tiny-gshard"
name = "gshard-e2"
overrides = ["n_experts=2"]
"""
    )
    out = tmp_path / "cmp"
    # a flag overrides the file's max_steps
    rc, _, err = cli("compare", "--sweep", sweep, "--max-steps", "2", "--out", out, *QUICK)
    assert rc == 0, err
    report = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == ["tiny-gshard", "tiny-gshard~dense-compute", "gshard-e2"]
    saved = json.loads((out / "runs/gshard-e2-seed3/config.json").read_text())
    assert saved["model"]["ffn"]["n_experts"] == 2 and saved["train"]["max_steps"] == 2
    moe, twin = runs["tiny-gshard"], runs["tiny-gshard~dense-compute"]
    assert twin["flops_per_token"] == pytest.approx(moe["flops_per_token"], rel=0.02)
    assert twin["active_params"] == pytest.approx(moe["active_params"], rel=0.02)
    assert twin["routing"] == {} and moe["routing"]
    # the table's priming accuracy is what `moe-train prime` says of the run
    task = str(compare.moe_data.example_task_path())
    rc, stdout, err = cli(
        "prime", out / "runs/gshard-e2-seed3", "--task", task, "--k-shot", "1", "--seed", "3"
    )
    assert rc == 0, err
    assert runs["gshard-e2"]["priming"] == json.loads(stdout)
    assert "priming acc (1-shot)" in (out / "results.md").read_text()


def test_without_matplotlib_the_tables_are_still_written(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    out = tmp_path / "cmp"
    argv = ["compare", "tiny-dense", "--max-steps", "2", "--out", out, *QUICK, *TINY]
    rc, stdout, err = cli(*argv)
    assert rc == 0, err
    assert "plots need matplotlib" in stdout
    assert not list(out.glob("*.png"))
    assert len(read_csv(out / "results.csv")) == 1
    assert json.loads((out / "results.json").read_text())["finished"] == 1
    md = (out / "results.md").read_text()
    assert "| tiny-dense | 1 |" in md and "No plots" in md
    # a finished comparison: --resume only rewrites the tables; other options are refused
    rc, stdout, err = cli("compare", "--out", out, "--resume", "--no-progress")
    assert rc == 0, err
    assert "finished before, skipped" in stdout
    rc, _, err = cli(*argv[: -len(TINY)], "d_model=48", *TINY[1:])
    cli.assert_one_line_error(rc, err, str(out), "another comparison", "d_model")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["no-such-preset"], ["no-such-preset"]),
        (["tiny-dense", "--twins", "flops"], ["--twins", "flops"]),
        (["tiny-dense", "--seeds", "0"], ["seeds", "0"]),
        (["tiny-dense", "tiny-sigma-moe", "n_experts=4"], ["run tiny-dense", "n_experts"]),
        (["tiny-dense", "--resume", "--out", "x"], ["--resume", "tiny-dense"]),
        ([], ["presets"]),
    ],
)
def test_mistakes_are_one_line_errors(cli, args, needles):
    rc, _, err = cli("compare", *args)
    cli.assert_one_line_error(rc, err, *needles)


def test_a_sweep_file_with_mistakes_is_refused_naming_them(cli, tmp_path):
    sweep = tmp_path / "sweep.toml"
    for text, needles in [
        ('max_step = 3\n[[runs]]\npreset = "tiny-dense"\n', ["max_step"]),
        ("max_steps = 3\n", ["[[runs]]"]),
        ('[[runs]]\npreset = "tiny-dense"\nlr = 1\n', ["run 1", "lr"]),
        ('[[runs]]\npreset = "tiny-dense"\n[[runs]]\npreset = "tiny-dense"\n', ["twice"]),
        ('seeds = "x"\n[[runs]]\npreset = "tiny-dense"\n', ["seeds", "'x'"]),
    ]:
        sweep.write_text(text)
        rc, _, err = cli("compare", "--sweep", sweep, "--plan")
        cli.assert_one_line_error(rc, err, str(sweep), *needles)


@pytest.mark.slow
def test_each_run_under_torchrun(cli, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "tiny-sigma-moe", "--max-steps", "2", "--nproc-per-node", "2"]
    rc, _, err = cli(*argv, "--device", "cpu", "--out", out, *QUICK, *TINY)
    assert rc == 0, err
    run_dir = out / "runs/tiny-sigma-moe-seed0"
    assert sorted(cli.losses(run_dir)) == [1, 2]
    row = read_csv(out / "results.csv")[0]
    assert float(row["valid_loss"]) == pytest.approx(final_valid(cli, run_dir), rel=1e-12)
