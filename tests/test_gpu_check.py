"""bench/gpu_check.py: its --cpu-smoke run goes through every section's code path on the CPU with
tiny shapes and writes its JSON, so that the one-shot GPU run is not the first time it executes."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_runs_every_section(tmp_path):
    gpu_check = _load()
    threads = torch.get_num_threads()
    out = tmp_path / "gpu_check.json"
    try:
        assert gpu_check.main(["--cpu-smoke", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["section"] for r in rows} == set(gpu_check.SECTIONS)
    # the bench targets compare timings of tiny CPU shapes: their verdicts mean nothing here
    failed = [r for r in rows if r["status"] == "fail" and not r["check"].startswith("target:")]
    assert not failed, failed
    assert [r for r in rows if r["section"] == "cupy"][0]["status"] == "skip"
    timed = [r for r in rows if r["check"].startswith("expert_mlp fwd+bwd")]
    assert timed and all(r["expert_mlp_ms"] > 0 and r["grouped_mm_ms"] > 0 for r in timed)
    targets = [r for r in rows if r["check"].startswith("target:")]
    assert len(targets) == 1 + len(gpu_check.SMOKE_SHAPES)
    assert report["meta"]["cpu_smoke"] is True


def test_without_cuda_it_says_so_and_exits_0(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "gpu_check.json"
    assert _load().main(["--out", str(out)]) == 0
    assert "no CUDA" in capsys.readouterr().out
    assert not out.exists()
