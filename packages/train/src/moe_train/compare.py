"""Several models trained alike and put in one table: `moe-train compare`.

A comparison is a `Spec`: entries (a preset, its overrides, optionally "the dense twin of it"),
trained once per seed on the same data with the same budget (steps, batch size) and evaluated
the same way. `run(spec, out_dir)` trains them one after another and writes

- `DIR/compare.json`: the spec (a rerun of the same comparison continues it; another is refused);
- `DIR/runs/NAME-seedS/`: each run, an ordinary moe-train run folder (`moe-train eval` reads it),
  plus `result.json`, written when the run is finished and evaluated (a rerun skips it);
- `DIR/results.md`, `results.csv`, `results.json` and, with matplotlib, PNG plots.

A run killed part-way continues from its latest checkpoint (`moe-train train --resume`
semantics); a run that has no checkpoint yet starts again. Every number of the tables is read
from the run's own metrics.jsonl and checkpoint:

- validation loss: the run's final evaluation (`train.final_eval_batches`, 0: the whole split);
  test loss: the final checkpoint on the test split with the same batches;
- wall time: the training loop's time, reconstructed from the `tokens_per_s` of each logged
  window (evaluations and checkpoints during training included, the final evaluation not), so a
  resumed run's time is the sum of its sessions; tokens/s = steps x tokens per step / wall time;
- training FLOPs = steps x tokens per step x FLOPs per token x 3 (a backward pass costs about two
  forward passes); FLOPs per token: `moe_models.flops_per_token` at the run's seq_len;
- routing: the run's last `routing` record (the last `train.routing_interval` steps), per layer:
  the entropy of the expert usage shares (nats; ln E is uniform use), the largest share and the
  share of assignments dropped by a capacity limit.

Means and standard deviations are over seeds (sample standard deviation; none for one seed).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import moe_data
import moe_models
import numpy as np

from moe_train import checkpoint as ckpt
from moe_train.config import MAX_SEED, RunConfig, resolve
from moe_train.errors import CLIError
from moe_train.metrics import level_metrics, read_history, uses_bpc
from moe_train.run_setup import with_corpus_vocab

FORMAT = "moe-train-compare"
VERSION = 1
MATCHES = ("params", "compute")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]*$")
# a sweep's own keys; the others of a sweep file are Spec fields
SWEEP_KEYS = ("runs", "out")
RUN_KEYS = ("preset", "name", "overrides", "twins")
DEFAULT_TASK = "default"
BACKWARD_FACTOR = 3
PLOTS_NOTE = "plots need matplotlib: pip install 'moe-train[plots]'"


@dataclass(frozen=True)
class Entry:
    """One model of a comparison. twin: "params" or "compute" makes it the dense twin
    (`moe_models.dense_twin`) of `preset` with `overrides`."""

    name: str
    preset: str
    overrides: tuple[str, ...] = ()
    twin: str | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "preset": self.preset,
            "overrides": list(self.overrides),
            "twin": self.twin,
        }


@dataclass
class Spec:
    """What a comparison trains. batch_size, max_steps and seq_len (None: each preset's own)
    are shared; overrides (KEY=VALUE, as for `moe-train train`) apply to every run before its
    entry's own; task (a JSONL file, or "default" for moe_data's shipped task) adds priming
    accuracy with k_shot demonstrations; nproc_per_node > 1 trains each run under torchrun."""

    entries: list[Entry]
    data: str | None = None
    max_steps: int = 1000
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 16
    seq_len: int | None = None
    overrides: list[str] = field(default_factory=list)
    task: str | None = None
    k_shot: int = 0
    normalize: bool = False
    nproc_per_node: int = 1
    device: str = "auto"
    plugins: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["entries"] = [e.to_dict() for e in self.entries]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Spec:
        entries = [
            Entry(e["name"], e["preset"], tuple(e.get("overrides", ())), e.get("twin"))
            for e in d["entries"]
        ]
        return cls(**{**d, "entries": entries})

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "nproc_per_node"):
            if getattr(self, name) < 1:
                raise CLIError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 1:
            raise CLIError(f"seq_len must be positive, got {self.seq_len}")
        if self.k_shot < 0:
            raise CLIError(f"k_shot must not be negative, got {self.k_shot}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise CLIError(f"seeds must be distinct and at least one, got {self.seeds}")
        if not self.entries:
            raise CLIError("a comparison needs at least one preset")
        names = [e.name for e in self.entries]
        for name in names:
            if not NAME.match(name):
                raise CLIError(
                    f"run name {name!r} must be letters, digits and . _ + ~ - (a folder name)"
                )
        duplicate = sorted({n for n in names if names.count(n) > 1})
        if duplicate:
            raise CLIError(
                f"run name(s) {', '.join(duplicate)} given twice; in a sweep file give each "
                "[[runs]] entry of the same preset its own name"
            )

    def task_path(self) -> str | None:
        if self.task == DEFAULT_TASK:
            return str(moe_data.example_task_path())
        return self.task


def twin_name(name: str, match: str) -> str:
    return f"{name}~dense-{match}"


def parse_twins(value, source: str) -> list[str]:
    """The dense twins `value` asks for: "params", "compute", "params,compute", a list of
    those, or "" / [] for none."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = value
    else:
        raise CLIError(f"{source}: twins must be params, compute or a list of them, got {value!r}")
    for item in items:
        if item not in MATCHES:
            raise CLIError(f"{source}: twins must be params or compute, got {item!r}")
    return list(dict.fromkeys(items))


# each seed is one training run per preset: more than this is a typo, not a plan
MAX_SEED_COUNT = 100


def parse_seeds(value, source: str) -> list[int]:
    """A count N (seeds 0..N-1), a list of seeds, or text: "3" or "0,4,7"."""
    if isinstance(value, str):
        try:
            items = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise CLIError(
                f"{source}: seeds must be a count or a list of integers, got {value!r}"
            ) from None
        value = items[0] if len(items) == 1 and "," not in value else items
    if isinstance(value, bool):
        raise CLIError(f"{source}: seeds must be a count or a list of integers, got {value!r}")
    if isinstance(value, int):
        if not 1 <= value <= MAX_SEED_COUNT:
            raise CLIError(
                f"{source}: seeds must be a count in [1, {MAX_SEED_COUNT}] (one run per seed and"
                f" preset), got {value}"
            )
        return list(range(value))
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        if len(value) > MAX_SEED_COUNT:
            raise CLIError(f"{source}: at most {MAX_SEED_COUNT} seeds, got {len(value)}")
        if bad := [v for v in value if not 0 <= v <= MAX_SEED]:
            raise CLIError(f"{source}: a seed must be in [0, {MAX_SEED}], got {bad[0]}")
        return list(value)
    raise CLIError(f"{source}: seeds must be a count or a list of integers, got {value!r}")


def _overrides(value, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise CLIError(f"{source}: overrides must be a list of KEY=VALUE strings, got {value!r}")
    return list(value)


SPEC_TYPES = {
    "data": str,
    "max_steps": int,
    "batch_size": int,
    "seq_len": int,
    "task": str,
    "k_shot": int,
    "normalize": bool,
    "nproc_per_node": int,
    "device": str,
}


def load_sweep(path: str | Path) -> dict:
    """A sweep file's contents, checked: Spec fields (data, seeds, overrides, ...), `twins`
    (the default of every run), `out`, and `[[runs]]` tables of preset, name, overrides, twins.
    Returns {"entries": [{name, preset, overrides, twins}], "out": ..., FIELD: value}, the
    entries and fields for `build_spec`."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"sweep file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f"sweep file {path} cannot be read: {e}") from None
    known = (*SPEC_TYPES, "seeds", "twins", "overrides", "plugins", *SWEEP_KEYS)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise CLIError(
            f"sweep file {path}: unknown key(s) {', '.join(unknown)}; expected {', '.join(known)}"
        )
    out: dict = {}
    for key, kind in SPEC_TYPES.items():
        if key in data:
            value = data[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise CLIError(f"sweep file {path}: {key} must be a {kind.__name__}, got {value!r}")
            out[key] = value
    if "seeds" in data:
        out["seeds"] = parse_seeds(data["seeds"], f"sweep file {path}")
    if "overrides" in data:
        out["overrides"] = _overrides(data["overrides"], f"sweep file {path}")
    if "plugins" in data:
        out["plugins"] = _strings(data["plugins"], f"sweep file {path}: plugins")
    if "out" in data:
        if not isinstance(data["out"], str):
            raise CLIError(f"sweep file {path}: out must be a string, got {data['out']!r}")
        out["out"] = data["out"]
    default_twins = parse_twins(data.get("twins", []), f"sweep file {path}")
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        raise CLIError(f"sweep file {path}: needs [[runs]] tables, each with a preset")
    entries = []
    for i, r in enumerate(runs, 1):
        where = f"sweep file {path}, run {i}"
        unknown = sorted(set(r) - set(RUN_KEYS))
        if unknown:
            raise CLIError(
                f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(RUN_KEYS)}"
            )
        if not isinstance(r.get("preset"), str):
            raise CLIError(f"{where}: preset must be a preset name, got {r.get('preset')!r}")
        name = r.get("name", r["preset"])
        if not isinstance(name, str):
            raise CLIError(f"{where}: name must be a string, got {name!r}")
        entries.append(
            {
                "name": name,
                "preset": r["preset"],
                "overrides": _overrides(r.get("overrides", []), where),
                "twins": parse_twins(r["twins"], where) if "twins" in r else default_twins,
            }
        )
    names = [e["name"] for e in entries]
    duplicate = sorted({n for n in names if names.count(n) > 1})
    if duplicate:
        raise CLIError(
            f"sweep file {path}: run name(s) {', '.join(duplicate)} given twice; give each "
            "[[runs]] entry of the same preset its own name"
        )
    out["entries"] = entries
    return out


def _strings(value, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CLIError(f"{source} must be a list of strings, got {value!r}")
    return list(value)


def build_spec(entries: list[dict], log=print, **fields) -> Spec:
    """The Spec of `entries` ({name, preset, overrides, twins}), each followed by its dense
    twins (a preset with no MoE layer has none, and is said so); every run's config is resolved
    here, so that a typo fails before anything trains."""
    spec = Spec(entries=[], **fields)
    corpus = load_data(spec.data)
    for e in entries:
        base = Entry(e["name"], e["preset"], tuple(e.get("overrides", ())))
        spec.entries.append(base)
        cfg = run_config(spec, base, spec.seeds[0], corpus.vocab_size)
        for match in e.get("twins", []):
            try:
                twin = moe_models.dense_twin(cfg.model, match)
            except ValueError as err:
                raise CLIError(f"{base.name}: {err}") from None
            if twin == cfg.model:
                log(f"note: {base.name} has no MoE layer, so no dense twin ({match})")
                continue
            spec.entries.append(
                dataclasses.replace(base, name=twin_name(base.name, match), twin=match)
            )
    spec.validate()
    if spec.task is not None:
        from moe_train.priming import load_task

        load_task(spec.task_path())
    return spec


def load_data(spec: str | None):
    from moe_train.data import load_corpus

    return load_corpus(spec)


def interval(max_steps: int) -> int:
    """Evaluations, checkpoints and routing records every tenth of the run (unless overridden),
    so that each curve has about ten points and a killed run loses at most a tenth."""
    return max(1, max_steps // 10)


def run_config(spec: Spec, entry: Entry, seed: int, vocab_size: int) -> RunConfig:
    """The resolved config of one run (the corpus's vocabulary size filled in, as training
    does, so that counts and the checkpoint's config agree)."""
    every = interval(spec.max_steps)
    flags = {
        "max_steps": spec.max_steps,
        "batch_size": spec.batch_size,
        "seed": seed,
        "device": spec.device,
        "eval_interval": every,
        "save_interval": every,
        "routing_interval": every,
    }
    try:
        cfg = resolve(
            plugins=spec.plugins,
            preset=entry.preset,
            data=spec.data,
            flags=flags,
            model_flags={"seq_len": spec.seq_len},
            overrides=[*spec.overrides, *entry.overrides],
        )
    except CLIError as e:
        raise CLIError(f"run {entry.name}: {e}") from None
    if entry.twin is not None:
        cfg.model = moe_models.dense_twin(cfg.model, entry.twin)
    return with_corpus_vocab(cfg, vocab_size)


@dataclass
class Run:
    entry: Entry
    seed: int
    cfg: RunConfig

    @property
    def folder(self) -> str:
        return f"{self.entry.name}-seed{self.seed}"


def plan(spec: Spec) -> list[Run]:
    vocab = load_data(spec.data).vocab_size
    return [
        Run(entry, seed, run_config(spec, entry, seed, vocab))
        for entry in spec.entries
        for seed in spec.seeds
    ]


def sizes(cfg: RunConfig) -> dict:
    counts = moe_models.count_parameters(cfg.model)
    return {
        "params": counts["total"],
        "active_params": counts["active"],
        "flops_per_token": moe_models.flops_per_token(cfg.model),
    }


def _differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


def check_manifest(out_dir: Path, spec: Spec) -> None:
    """Write DIR/compare.json, or check that the one there describes this same comparison."""
    path = out_dir / "compare.json"
    wanted = {"format": FORMAT, "version": VERSION, "spec": spec.to_dict()}
    if path.exists():
        saved = read_manifest(out_dir)
        diff = _differences(saved, spec.to_dict())
        if diff:
            raise CLIError(
                f"{out_dir} holds another comparison ({'; '.join(diff[:3])}); rerun it with the "
                "same options, continue it with --resume, or choose another --out"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(path, json.dumps(wanted, indent=2) + "\n")


def read_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / "compare.json"
    if not path.is_file():
        raise CLIError(f"{out_dir} holds no comparison (no compare.json) to resume")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f"{path} cannot be read: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CLIError(f"{path} is not a moe-train comparison of version {VERSION}")
    return manifest["spec"]


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def finished(run_dir: Path, cfg: RunConfig) -> dict | None:
    """The run's result if it is finished and evaluated; a result of other settings is an error."""
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    diff = _differences(result["config"], cfg.to_dict())
    if diff:
        raise CLIError(
            f"{run_dir} was trained with other settings ({'; '.join(diff[:3])}); "
            "choose another --out"
        )
    return result


def train_run(run: Run, run_dir: Path, spec: Spec, progress: bool, tensorboard: bool) -> bool:
    """Train (or continue) one run to its last step; False when it was interrupted."""
    latest = ckpt.latest(run_dir)
    resume = latest is not None
    if resume:
        saved = ckpt.load(latest)["run_config"]
        diff = _differences(saved, run.cfg.to_dict())
        if diff:
            raise CLIError(
                f"{run_dir} holds a run of other settings ({'; '.join(diff[:3])}); "
                "choose another --out"
            )
    elif run_dir.exists():
        # killed before its first checkpoint: nothing to continue, and its log lines would stay
        shutil.rmtree(run_dir)
    if spec.nproc_per_node > 1:
        return _torchrun(run, run_dir, spec, resume, tensorboard)
    from moe_train.trainer import Trainer, TrainOptions

    opts = TrainOptions(out_dir=run_dir, resume=resume, progress=progress, tensorboard=tensorboard)
    result = Trainer(run.cfg, opts).run()
    return not result.interrupted and result.step >= run.cfg.train.max_steps


def _torchrun(run: Run, run_dir: Path, spec: Spec, resume: bool, tensorboard: bool) -> bool:
    configs = run_dir.parent.parent / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    config_file = configs / f"{run.folder}.json"
    _write_text(config_file, json.dumps(run.cfg.to_dict(), indent=2) + "\n")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    argv += ["--nproc-per-node", str(spec.nproc_per_node), "-m", "moe_train.cli", "train"]
    argv += ["--out", str(run_dir), "--no-progress"]
    # the comparison's plugins, named: a resumed run imports no plugin it merely records
    argv += [arg for plugin in spec.plugins for arg in ("--plugin", plugin)]
    argv += ["--resume"] if resume else ["--config", str(config_file)]
    if not tensorboard:
        argv.append("--no-tensorboard")
    # torchrun's own default, without its warning; a thread count the user set is kept
    done = subprocess.run(argv, env={"OMP_NUM_THREADS": "1", **os.environ})
    if done.returncode != 0:
        raise CLIError(f"run {run.folder}: torchrun exited with code {done.returncode}")
    latest = ckpt.latest(run_dir)
    return latest is not None and ckpt.load(latest)["step"] >= run.cfg.train.max_steps


def read_metrics(run_dir: Path) -> list[dict]:
    return read_history(run_dir / "metrics.jsonl")


def curves(records: list[dict], tokens_per_step: int) -> tuple[list[dict], float]:
    """The validation points [{step, valid_loss, wall_s}] (the last record of a step wins: a
    resumed run logs again what came after its checkpoint) and the loop's wall time."""
    train = {r["step"]: r for r in records if "train_loss" in r and r.get("tokens_per_s")}
    steps, times = [0], [0.0]
    for step in sorted(train):
        times.append(times[-1] + (step - steps[-1]) * tokens_per_step / train[step]["tokens_per_s"])
        steps.append(step)
    valid = {r["step"]: r["valid_loss"] for r in records if "valid_loss" in r}
    points = [
        {"step": s, "valid_loss": valid[s], "wall_s": float(np.interp(s, steps, times))}
        for s in sorted(valid)
    ]
    return points, times[-1]


def routing_summary(records: list[dict]) -> dict:
    """Per layer of the last routing record: experts, usage shares and what the tables show."""
    last = next((r["routing"] for r in reversed(records) if "routing" in r), {})
    out = {}
    for layer in sorted(last, key=_natural):
        s = last[layer]
        usage = s["usage"]
        out[layer] = {
            "n_experts": len(usage),
            "usage": usage,
            "usage_entropy": -sum(u * math.log(u) for u in usage if u > 0),
            "usage_entropy_max": math.log(len(usage)) if usage else 0.0,
            "max_share": max(usage, default=0.0),
            "dropped_share": s["dropped_frac"],
            "batch_entropy": s["entropy"],
        }
    return out


def evaluate_run(run: Run, run_dir: Path, spec: Spec) -> dict:
    """The run's result from its metrics.jsonl and final checkpoint (test loss, priming)."""
    from moe_train.distributed import DistEnv, pick_device
    from moe_train.evaluate import evaluate
    from moe_train.loading import load_model_state

    cfg = run.cfg
    payload = ckpt.load(ckpt.latest(run_dir))
    device = pick_device(cfg.train.device)
    model = moe_models.build(cfg.model)
    load_model_state(model, payload)
    model.to(device)
    corpus = load_data(cfg.data)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    try:
        test_loss = evaluate(
            model,
            corpus.test,
            batch_size=cfg.train.eval_batch_size,
            seq_len=cfg.model.seq_len,
            env=env,
            precision=cfg.train.precision,
            max_batches=cfg.train.final_eval_batches,
        )
    except ValueError as e:
        raise CLIError(f"run {run.folder}, test split: {e}") from None
    records = read_metrics(run_dir)
    final = [r for r in records if r.get("final")]
    if not final:
        raise CLIError(f"{run_dir}/metrics.jsonl has no final validation record")
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    points, wall = curves(records, tokens_per_step)
    counts = sizes(cfg)
    steps = int(payload["step"])
    flops_per_step = tokens_per_step * counts["flops_per_token"] * BACKWARD_FACTOR
    result = {
        "name": run.entry.name,
        "preset": run.entry.preset,
        "twin": run.entry.twin,
        "seed": run.seed,
        "dir": f"runs/{run.folder}",
        "level": corpus.level,
        **counts,
        "seq_len": cfg.model.seq_len,
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "train_flops": steps * flops_per_step,
        "wall_s": wall,
        "tokens_per_s": steps * tokens_per_step / wall if wall > 0 else None,
        **level_metrics("valid", final[-1]["valid_loss"], corpus.level),
        **level_metrics("test", test_loss, corpus.level),
        "priming": None,
        "routing": routing_summary(records),
        "curve": [{**p, "train_flops": p["step"] * flops_per_step} for p in points],
        "config": cfg.to_dict(),
    }
    if spec.task is not None:
        from moe_train.priming import accuracy, load_task

        result["priming"] = accuracy(
            model,
            corpus,
            load_task(spec.task_path()),
            k_shot=spec.k_shot,
            seed=run.seed,
            max_len=cfg.model.seq_len,
            device=device,
            normalize=spec.normalize,
        )
    _write_text(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def run(
    spec: Spec,
    out_dir: str | Path,
    *,
    progress: bool = True,
    tensorboard: bool = True,
    log=print,
) -> bool:
    """Train and evaluate every run not finished yet, then write the tables and plots; False
    when a run was interrupted (the tables then hold the finished runs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError("run `moe-train compare` itself as one process; use --nproc-per-node N")
    out_dir = Path(out_dir)
    runs = plan(spec)
    check_manifest(out_dir, spec)
    complete = True
    for i, r in enumerate(runs, 1):
        run_dir = out_dir / "runs" / r.folder
        if finished(run_dir, r.cfg) is not None:
            log(f"[{i}/{len(runs)}] {r.folder}: finished before, skipped")
            continue
        log(f"[{i}/{len(runs)}] {r.folder}: training ({r.entry.preset})")
        if not train_run(r, run_dir, spec, progress, tensorboard):
            complete = False
            log(f"[{i}/{len(runs)}] {r.folder}: interrupted; rerun the command to continue")
            break
        result = evaluate_run(r, run_dir, spec)
        unit = "bpc" if uses_bpc(result["level"]) else "ppl"
        log(
            f"[{i}/{len(runs)}] {r.folder}: valid {unit} {result['valid_' + unit]:.4f}, "
            f"test {unit} {result['test_' + unit]:.4f}"
        )
        # the tables after every run (a look at the progress); plots, which take seconds, once
        write_reports(out_dir, spec, runs, log=lambda *a, **k: None, plots=False)
    write_reports(out_dir, spec, runs, log=log)
    return complete


def collect(out_dir: Path, runs: list[Run]) -> list[dict]:
    results = []
    for r in runs:
        path = out_dir / "runs" / r.folder / "result.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
    return results


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(results: list[dict]) -> list[dict]:
    """One row per entry name: sizes, and means and standard deviations over its seeds."""
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    rows = []
    for group in by_name.values():
        first = group[0]
        unit = "bpc" if uses_bpc(first["level"]) else "ppl"
        row = {k: first[k] for k in ("name", "preset", "twin", "params", "active_params")}
        row["flops_per_token"] = first["flops_per_token"]
        row["train_flops"] = first["train_flops"]
        row["seeds"] = [r["seed"] for r in group]
        keys = ["wall_s", "tokens_per_s", "valid_loss", f"valid_{unit}", "test_loss"]
        keys.append(f"test_{unit}")
        for key in keys:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r[key] for r in group])
        priming = [r["priming"]["accuracy"] for r in group if r.get("priming")]
        row["priming_accuracy_mean"], row["priming_accuracy_std"] = _mean_std(priming)
        layers = list(first["routing"])
        row["routing"] = {
            layer: {
                "n_experts": first["routing"][layer]["n_experts"],
                **{
                    key: statistics.fmean(r["routing"][layer][key] for r in group)
                    for key in ("usage_entropy", "usage_entropy_max", "max_share", "dropped_share")
                },
            }
            for layer in layers
            if all(layer in r["routing"] for r in group)
        }
        rows.append(row)
    return rows


def _si(n: float) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def _pm(mean, std, digits: int = 4) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


CSV_FIELDS = (
    "name",
    "preset",
    "twin",
    "seed",
    "params",
    "active_params",
    "flops_per_token",
    "seq_len",
    "steps",
    "tokens_per_step",
    "train_flops",
    "wall_s",
    "tokens_per_s",
    "valid_loss",
    "valid_bpc",
    "valid_ppl",
    "test_loss",
    "test_bpc",
    "test_ppl",
    "priming_accuracy",
    "usage_entropy",
    "max_usage_share",
    "dropped_share",
)


def csv_row(r: dict) -> dict:
    """A run's scalar columns; the routing ones are means over its routed layers (the largest
    share: the maximum over them)."""
    layers = list(r["routing"].values())
    row = {k: r.get(k) for k in CSV_FIELDS}
    row["priming_accuracy"] = r["priming"]["accuracy"] if r.get("priming") else None
    row["usage_entropy"] = statistics.fmean(x["usage_entropy"] for x in layers) if layers else None
    row["max_usage_share"] = max((x["max_share"] for x in layers), default=None)
    row["dropped_share"] = statistics.fmean(x["dropped_share"] for x in layers) if layers else None
    return {k: "" if v is None else v for k, v in row.items()}


def markdown(
    spec: Spec, rows: list[dict], unit: str, n_done: int, n_runs: int, plots: list[str] | None
) -> str:
    """plots: the PNG files; [] when matplotlib is missing, None when not drawn yet."""
    lines = ["# Comparison", ""]
    seq = f"seq_len {spec.seq_len}" if spec.seq_len else "each preset's own seq_len"
    lines.append(
        f"Data `{spec.data or 'default'}`; {spec.max_steps} steps of batch {spec.batch_size} "
        f"({seq}); seeds {', '.join(map(str, spec.seeds))}; shared overrides: "
        f"{' '.join(f'`{o}`' for o in spec.overrides) or 'none'}. "
        f"Valid and test {unit}: mean ± sample standard deviation over seeds."
    )
    if n_done < n_runs:
        lines += ["", f"**{n_done} of {n_runs} runs finished**; rerun the command to continue."]
    priming = spec.task is not None
    head = ["run", "seeds", "params", "active", "FLOPs/token", "train FLOPs", "tokens/s"]
    head += ["wall s", f"valid {unit}", f"test {unit}"]
    if priming:
        head.append(f"priming acc ({spec.k_shot}-shot)")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["name"],
            str(len(r["seeds"])),
            _si(r["params"]),
            _si(r["active_params"]),
            _si(r["flops_per_token"]),
            _si(r["train_flops"]),
            f"{r['tokens_per_s_mean']:.0f}" if r["tokens_per_s_mean"] else "–",
            f"{r['wall_s_mean']:.0f}",
            _pm(r[f"valid_{unit}_mean"], r[f"valid_{unit}_std"]),
            _pm(r[f"test_{unit}_mean"], r[f"test_{unit}_std"]),
        ]
        if priming:
            cells.append(_pm(r["priming_accuracy_mean"], r["priming_accuracy_std"], 3))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Training FLOPs = steps × tokens per step × FLOPs per token × 3 (forward + backward). "
        "Wall time: the training loop (evaluations during training included).",
    ]
    routed = [r for r in rows if r["routing"]]
    if routed:
        lines += [
            "",
            "## Routing",
            "",
            "The last routing window of each run, per routed layer (in layer order), mean over "
            "seeds: entropy of the expert usage shares relative to ln E (1 = uniform), the "
            "largest usage share and the share of assignments dropped.",
            "",
            "| run | experts | usage entropy / ln E | max usage share | dropped share |",
            "|---|---|---|---|---|",
        ]
        for r in routed:
            layers = list(r["routing"].values())
            experts = sorted({x["n_experts"] for x in layers})
            rel = [
                x["usage_entropy"] / x["usage_entropy_max"] if x["usage_entropy_max"] else 0.0
                for x in layers
            ]
            cells = [
                r["name"],
                ", ".join(map(str, experts)),
                " / ".join(f"{v:.3f}" for v in rel),
                " / ".join(f"{x['max_share']:.3f}" for x in layers),
                " / ".join(f"{x['dropped_share']:.3f}" for x in layers),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""]
    if plots is None:
        lines.append("The plots are drawn when the comparison ends.")
    elif plots:
        lines += [f"![{p}]({p})" for p in plots]
    else:
        lines.append(f"No plots: {PLOTS_NOTE}.")
    return "\n".join(lines) + "\n"


def write_reports(
    out_dir: Path, spec: Spec, runs: list[Run], log=print, plots: bool = True
) -> list[Path]:
    """results.md, results.csv, results.json and (plots=True) the plots of the finished runs;
    the paths."""
    results = collect(out_dir, runs)
    if not results:
        return []
    rows = summarize(results)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow(csv_row(r))
    _write_text(out_dir / "results.csv", buf.getvalue())
    summary = {
        "format": FORMAT,
        "spec": spec.to_dict(),
        "finished": len(results),
        "planned": len(runs),
        "runs": [{k: v for k, v in r.items() if k != "config"} for r in results],
        "summary": rows,
    }
    _write_text(out_dir / "results.json", json.dumps(summary, indent=2) + "\n")
    drawn = None
    if plots:
        try:
            drawn = write_plots(out_dir, results)
        except ImportError:
            drawn = []
            log(f"note: {PLOTS_NOTE}")
    unit = "bpc" if uses_bpc(results[0]["level"]) else "ppl"
    text = markdown(spec, rows, unit, len(results), len(runs), drawn)
    _write_text(out_dir / "results.md", text)
    paths = [out_dir / n for n in ("results.md", "results.csv", "results.json", *(drawn or []))]
    log(f"results: {out_dir}/results.md, .csv, .json and {len(drawn or [])} plot(s)")
    return paths


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def write_plots(out_dir: Path, results: list[dict]) -> list[str]:
    """Validation curves against steps, wall time and training FLOPs (mean over seeds at each
    evaluated step) and, per routed run, its last usage shares per layer and expert; the file
    names. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = "bpc" if uses_bpc(results[0]["level"]) else "ppl"

    def shown(loss: float) -> float:
        return level_metrics("v", loss, results[0]["level"])[f"v_{unit}"]

    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    files = []
    for key, label, fname in (
        ("step", "training steps", "valid_vs_steps.png"),
        ("wall_s", "training wall time (s)", "valid_vs_wall_time.png"),
        ("train_flops", "training FLOPs (3 × forward)", "valid_vs_train_flops.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, group in by_name.items():
            common = set.intersection(*({p["step"] for p in r["curve"]} for r in group))
            steps = sorted(common)
            at = [{p["step"]: p for p in r["curve"]} for r in group]
            xs = [statistics.fmean(a[s][key] for a in at) for s in steps]
            ys = [statistics.fmean(shown(a[s]["valid_loss"]) for a in at) for s in steps]
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
        if key == "train_flops":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation {unit}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    for name, group in by_name.items():
        if not group[0]["routing"]:
            continue
        fig, axes = plt.subplots(1, len(group), figsize=(4.5 * len(group), 3), squeeze=False)
        for ax, r in zip(axes[0], group, strict=True):
            layers = list(r["routing"])
            width = max(r["routing"][layer]["n_experts"] for layer in layers)
            usage_LE = np.full((len(layers), width), np.nan)
            for i, layer in enumerate(layers):
                u = r["routing"][layer]["usage"]
                usage_LE[i, : len(u)] = u
            image = ax.imshow(usage_LE, aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_yticks(range(len(layers)), [_layer_label(layer) for layer in layers])
            ax.set_xlabel("expert")
            ax.set_title(f"{name}, seed {r['seed']}", fontsize=9)
            fig.colorbar(image, ax=ax, label="usage share")
        fig.tight_layout()
        fname = f"usage_{_file_name(name)}.png"
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        files.append(fname)
    return files


def _natural(name: str) -> list:
    """A sort key that puts `layers.10` after `layers.2`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _layer_label(layer: str) -> str:
    """The layer index of a module name such as `layers.2.ffn` (the name itself otherwise)."""
    numbers = re.findall(r"\d+", layer)
    return f"layer {numbers[0]}" if numbers else layer
