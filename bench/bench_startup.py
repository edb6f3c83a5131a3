"""Start-up a person feels (issue 22): `moe-train generate RUN --prompt "The" --max-new-tokens 50`
from the command's start to its first generated token, in fresh processes.

Two runs are trained here for one step on the built-in corpus (character-level, so the vocabulary
is small; the model's layers are the preset's): tiny-sigma-moe and sigma-moe-wt103-small. For
each, `repeats` times, round-robin over the runs:
- the command itself (the `moe-train` script of this environment), timed from this process:
  wall and CPU time (the child's utime + stime from /proc at the moment its first token arrives
  on the pipe) to the first generated token;
- a driver process that does what `generate` does, step by step, and reports where the time
  goes: interpreter start-up, imports, loading the checkpoint (model built, weights and
  tokenizer read), and `forward`: the prompt's forward pass and the first sampled token.
Both with torch's default number of threads and with one. Medians are reported, with the
1-minute load average: on a shared machine the wall times depend on the load, and with more
than one thread so do the CPU times (threads that wait for each other). Target: the first token of the tiny run within 5 s
of wall time on a quiet machine. --quick: the tiny run only, 3 repeats.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The"
NEW_TOKENS = 50
TARGET_S = 5.0
# torch's default threads (what a user gets), and one (OMP_NUM_THREADS=1): on a loaded machine a
# parallel op waits for its other threads to be scheduled, and the first forward pays for it
THREADS = (None, 1)
RUNS = {"tiny-sigma-moe": ["--batch-size", "4"], "sigma-moe-wt103-small": ["--batch-size", "2"]}
TRAIN = [
    "--max-steps",
    "1",
    "--no-progress",
    "--no-tensorboard",
    "--device",
    "cpu",
    "train.eval_batches=1",
    "train.final_eval_batches=1",
    "train.warmup_steps=1",
]

# what `moe_train.commands.generate.write` does, with a mark after each stage
DRIVER = """
import json, resource, sys, time

def mark(name):
    r = resource.getrusage(resource.RUSAGE_SELF)
    marks[name] = (time.time(), r.ru_utime + r.ru_stime)

marks = {}
mark("start")
import moe_models, torch
from moe_train import loading
mark("imports")
loaded = loading.load(sys.argv[1])
prompt = torch.tensor([loading.encode(loaded.vocab, sys.argv[2])], device=loaded.device)
mark("load")
tokens = moe_models.stream(loaded.model, prompt, 1, greedy=True)
next(tokens)
mark("forward")
print(json.dumps(marks))
"""


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("moe-train")
    return [str(script)] if script.exists() else [sys.executable, "-m", "moe_train.cli"]


def _cpu_s(pid: int) -> float:
    """utime + stime of a live process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _train(name: str, out: Path) -> Path:
    run = out / name
    done = subprocess.run(
        [*_cli(), "train", "--preset", name, "--out", str(run), *RUNS[name], *TRAIN],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"training {name} failed: {done.stderr[-2000:]}")
    return run


def _command(run: Path, env: dict) -> dict:
    """Wall and CPU time of `moe-train generate` to its first token (then it is stopped: the
    rest is decoding, which bench_generate measures)."""
    argv = [*_cli(), "generate", str(run), "--prompt", PROMPT]
    argv += ["--max-new-tokens", str(NEW_TOKENS), "--seed", "1"]
    started = time.perf_counter()
    child = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=env
    )
    seen = b""
    try:
        while chunk := child.stdout.read(1):
            seen += chunk
            if len(seen) > len(PROMPT):
                return {
                    "first_token_wall_s": time.perf_counter() - started,
                    "first_token_cpu_s": _cpu_s(child.pid),
                }
        raise RuntimeError(f"generate printed no token: {child.stderr.read().decode()[-2000:]}")
    finally:
        child.kill()
        child.communicate()


def _stages(run: Path, env: dict) -> dict:
    """Where the time to the first token goes, from the driver's marks (wall, CPU)."""
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(run), PROMPT], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"the driver failed: {done.stderr[-2000:]}")
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    names = list(marks)
    out = {"interpreter_wall_s": marks["start"][0] - started}
    for before, after in zip(names, names[1:], strict=False):
        out[f"{after}_wall_s"] = marks[after][0] - marks[before][0]
        out[f"{after}_cpu_s"] = marks[after][1] - marks[before][1]
    return out


def run(quick: bool) -> list[dict]:
    names = list(RUNS)[:1] if quick else list(RUNS)
    repeats = 3 if quick else 5
    settings = [(name, threads) for name in names for threads in THREADS]
    out = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        runs = {name: _train(name, out) for name in names}
        samples = {setting: [] for setting in settings}
        loads = []
        for _ in range(repeats):
            for name, threads in settings:
                env = dict(os.environ)
                if threads is not None:
                    env["OMP_NUM_THREADS"] = str(threads)
                loads.append(os.getloadavg()[0])
                sample = {**_command(runs[name], env), **_stages(runs[name], env)}
                samples[name, threads].append(sample)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rows = []
    for name, threads in settings:
        row = {"run": name, "threads": threads or f"torch's ({os.cpu_count()} cores)"}
        row["repeats"] = repeats
        for key in samples[name, threads][0]:
            row[key] = round(statistics.median(s[key] for s in samples[name, threads]), 2)
        row["target_s"] = TARGET_S if name == "tiny-sigma-moe" else None
        row["load_avg_1m"] = round(statistics.median(loads), 1)
        rows.append(row)
    return rows
