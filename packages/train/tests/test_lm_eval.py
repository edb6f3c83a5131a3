"""The lm-evaluation-harness adapter (model `moe`) on a local multiple-choice task in lm-eval's
task format (a YAML and a JSONL made here): its accuracy is `moe-train prime`'s on the same
examples; rolling log-likelihoods and generation agree with the model read directly. Offline."""

import json
import os
from types import SimpleNamespace

import moe_data
import moe_models
import pytest
import torch
from moe_train.cli import main
from torch.nn import functional as F

TASK_YAML = """\
task: moe_verses
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-home")
    values = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(home),
        "HF_DATASETS_CACHE": str(home / "datasets"),
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def adapter(offline):
    pytest.importorskip("lm_eval")
    import moe_train.lm_eval_adapter as adapter

    return adapter


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-eval") / "run"
    argv = ["train", "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--no-progress"]
    argv += ["--no-tensorboard", "train.warmup_steps=1", "train.final_eval_batches=1"]
    argv += ["train.eval_batch_size=4", "d_model=32", "n_layers=1", "n_heads=2", "seq_len=32"]
    argv += ["d_ff=64", "n_experts=4", "expert_size=16"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The first 12 verse completions of moe-data's example task, without its header line (the
    same examples for lm-eval and for prime, whose template is the bare context)."""
    folder = tmp_path_factory.mktemp("task")
    lines = moe_data.example_task_path().read_text().splitlines()
    examples = [line for line in lines if '"choices"' in line][:12]
    jsonl = folder / "verses.jsonl"
    jsonl.write_text("\n".join(examples) + "\n")
    (folder / "moe_verses.yaml").write_text(TASK_YAML.format(jsonl=jsonl))
    return folder, jsonl


def test_lm_eval_cli_accuracy_equals_prime(cli, adapter, run, task, tmp_path):
    folder, jsonl = task
    rc, out, err = cli("prime", run, "--task", jsonl, "--no-progress")
    assert rc == 0, err
    primed = json.loads(out)
    results = tmp_path / "results"
    rc, _, err = cli(
        "lm-eval",
        "--model",
        "moe",
        "--model_args",
        f"path={run}",
        "--device",
        "cpu",
        "--batch_size",
        "5",
        "--tasks",
        "moe_verses",
        "--include_path",
        folder,
        "--output_path",
        results,
    )
    assert rc == 0, err
    files = list(results.rglob("results_*.json"))
    assert len(files) == 1, list(results.rglob("*"))
    scores = json.loads(files[0].read_text())["results"]["moe_verses"]
    assert scores["acc,none"] == pytest.approx(primed["accuracy"])
    assert primed["n"] == 12


def request(*args):
    return SimpleNamespace(args=args)


def test_loglikelihoods_are_primes_scores(adapter, run):
    from moe_train.priming import choice_scores, sequence

    lm = adapter.MoELM(path=str(run), device="cpu", batch_size=2)
    vocab = lm.vocab
    pairs = [("And God said", " Let"), ("In the beginning", " God created"), ("A", "nd")]
    got = lm.loglikelihood([request(c, x) for c, x in pairs], disable_tqdm=True)
    for (context, cont), (score, greedy) in zip(pairs, got, strict=True):
        pair = sequence(vocab.encode(context).tolist(), vocab.encode(cont).tolist(), 32)
        assert score == pytest.approx(choice_scores(lm.model, [pair], "cpu")[0], abs=1e-4)
        logits = lm.model(torch.tensor([pair[0]])).logits[0]
        scored = torch.tensor(pair[1]) != -100
        best = logits.argmax(-1)[scored].tolist() == torch.tensor(pair[1])[scored].tolist()
        assert greedy == best


def test_rolling_loglikelihood_reads_the_text_with_the_memory(adapter, run):
    from moe_models.generate import feed

    lm = adapter.MoELM(path=str(run), device="cpu", batch_size=2)
    texts = ["And God said, Let there be light: and there was light." * 2, "In the", "A"]
    got = lm.loglikelihood_rolling([request(t) for t in texts], disable_tqdm=True)
    for text, value in zip(texts, got, strict=True):
        ids = torch.tensor([lm.vocab.encode(text).tolist()])
        if ids.shape[1] < 2:
            assert value == 0.0
            continue
        with torch.no_grad():
            logp = F.log_softmax(feed(lm.model, ids[:, :-1]).logits.double(), -1)
        expected = logp[0].gather(-1, ids[0, 1:, None]).sum()
        assert value == pytest.approx(float(expected), rel=1e-4)


def test_generate_until_is_greedy_generation_cut_at_the_stop(adapter, run):
    lm = adapter.MoELM(path=str(run), device="cpu", batch_size=2)
    contexts = ["And God said", "And God saw", "Thou shalt"]
    options = {"until": ["e"], "max_gen_toks": 12, "do_sample": False}
    got = lm.generate_until([request(c, options) for c in contexts], disable_tqdm=True)
    for context, text in zip(contexts, got, strict=True):
        prompt = torch.tensor([lm.vocab.encode(context).tolist()])
        new = moe_models.generate(lm.model, prompt, 12, greedy=True)[0, prompt.shape[1] :]
        full = lm.vocab.decode(new.tolist())
        assert text == full.split("e")[0]


def test_registered_under_moe(adapter):
    from lm_eval.api.registry import get_model

    assert get_model("moe") is adapter.MoELM
