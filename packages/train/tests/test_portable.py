"""Models that leave the CLI: the tokenizer travels with the run, export (plain and Hugging Face),
generate, and a BPE run evaluated, primed, fine-tuned and continued after its corpus is gone."""

import json
import os
import random
import sys

import moe_data
import moe_models
import pytest
import safetensors.torch
import torch
from moe_train import checkpoint as ckpt
from moe_train.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY = ["d_model=32", "n_layers=1", "n_heads=2", "seq_len=16", "d_ff=64"]
QUICK = ["--max-steps", "2", "--batch-size", "2", "--no-progress", "--no-tensorboard"]
QUICK += ["train.warmup_steps=1", "train.final_eval_batches=1", "train.eval_batch_size=2"]
WORDS = "the king said unto them go ye into the city and bring forth bread and water".split()


def train(out, *extra):
    assert main(["train", "--out", str(out), *QUICK, *TINY, *extra]) == 0
    return out


def write_task(path, n=6):
    lines = [json.dumps({"name": "yes", "separator": "\n"})]
    for i in range(n):
        choices = [" yes", " no"] if i % 2 else [" no", " yes"]
        example = {"context": f"is {i} ok?", "choices": choices, "label": choices.index(" yes")}
        lines.append(json.dumps(example))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("char") / "run", "n_experts=4", "expert_size=16")


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A BPE run on a text file made here, then the file and its cache deleted."""
    root = tmp_path_factory.mktemp("bpe")
    rng = random.Random(0)
    text = root / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(600)) + "\n")
    cache = root / "cache"
    saved = os.environ.get("MOE_DATA_CACHE")
    os.environ["MOE_DATA_CACHE"] = str(cache)
    try:
        run = train(root / "run", "--data", f"bpe:{text}", "--preset", "tiny-dense")
        vocab = moe_data.load(f"bpe:{text}").vocab
    finally:
        if saved is None:
            os.environ.pop("MOE_DATA_CACHE")
        else:
            os.environ["MOE_DATA_CACHE"] = saved
    text.unlink()
    for p in sorted(cache.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    return run, vocab, root


def checkpoint_model(run):
    from moe_train.config import RunConfig

    payload = ckpt.load(run)
    model = moe_models.build(RunConfig.from_dict(payload["run_config"]).model)
    model.load_state_dict(payload["model"])
    return model.eval()


def test_a_run_keeps_its_tokenizer(char_run):
    vocab = moe_data.load_tokenizer(char_run / "tokenizer.json")
    corpus = moe_data.default_corpus()
    assert vocab.to_json() == corpus.vocab.to_json()


def test_a_bpe_run_works_after_its_corpus_is_deleted(cli, bpe_run, tmp_path):
    run, vocab, root = bpe_run
    assert not (root / "corpus.txt").exists()
    assert moe_data.load_tokenizer(run / "tokenizer.json").to_json() == vocab.to_json()
    rc, _, err = cli("eval", run, "--max-batches", "1", "--batch-size", "2", "--no-progress")
    cli.assert_one_line_error(rc, err, "corpus.txt")
    other = tmp_path / "other.txt"
    other.write_text("the king said unto them go into the city\n" * 30)
    rc, out, err = cli("eval", run, "--text", other, "--batch-size", "2", "--no-progress")
    assert rc == 0, err
    record = json.loads((run / "checkpoints" / "eval-step-00000002-other.json").read_text())
    assert record["text_ppl"] > 1 and "text: loss" in out
    task = write_task(tmp_path / "yes.jsonl")
    rc, out, err = cli("prime", run, "--task", task, "--no-progress")
    assert rc == 0, err
    result = json.loads(out)
    saved = json.loads((run / "prime-yes-k0.json").read_text())
    assert saved["accuracy"] == result["accuracy"] and saved["n"] == 6
    assert str(run / "prime-yes-k0.json") in err
    rc, out, err = cli("generate", run, "--prompt", "the king", "--max-new-tokens", "5")
    assert rc == 0, err and out.startswith("the king")
    ft = tmp_path / "ft"
    rc, out, err = cli("finetune", run, "--task", task, "--max-steps", "3", "--out", ft)
    assert rc == 0, err
    metrics = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train_loss" in m] == [3, 4, 5]
    assert json.loads((ft / "config.json").read_text())["data"] == f"bpe:{root / 'corpus.txt'}"
    assert json.loads((ft / "finetune.json").read_text())["options"]["max_steps"] == 3
    assert moe_data.load_tokenizer(ft / "tokenizer.json").to_json() == vocab.to_json()
    rc, _, err = cli("prime", ft, "--task", task, "--no-progress")
    assert rc == 0, err


def test_a_run_without_a_tokenizer_says_what_is_missing(cli, char_run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(char_run, old)
    for name in ("tokenizer.json", "tokenizer_meta.json"):
        (old / name).unlink()
    task = write_task(tmp_path / "yes.jsonl")
    rc, _, err = cli("prime", old, "--task", task)
    cli.assert_one_line_error(rc, err, "tokenizer.json", "--data")
    rc, _, err = cli("prime", old, "--task", task, "--data", "default", "--no-progress")
    assert rc == 0, err
    rc, _, err = cli("eval", old, "--max-batches", "1", "--batch-size", "2", "--no-progress")
    assert rc == 0, err


def test_generate_is_deterministic_under_a_seed(cli, char_run):
    args = ["generate", char_run, "--prompt", "And God", "--max-new-tokens", "24"]
    runs = [cli(*args, "--seed", seed, "--temperature", "1.5") for seed in (1, 1, 2)]
    assert all(rc == 0 for rc, _, _ in runs), runs
    assert runs[0][1] == runs[1][1] and runs[0][1] != runs[2][1]
    rc, out, _ = cli(*args, "--greedy")
    vocab = moe_data.load_tokenizer(char_run / "tokenizer.json")
    prompt = torch.tensor([vocab.encode("And God").tolist()])
    expected = moe_models.generate(checkpoint_model(char_run), prompt, 24, greedy=True)
    assert out == vocab.decode(expected[0].tolist()) + "\n"


def test_generate_streams_multi_byte_characters_whole():
    from moe_train.commands.generate import IncrementalDecoder

    decoder = IncrementalDecoder(moe_data.ByteVocab())
    pieces = [decoder.add(b) for b in "añb€".encode()]
    assert pieces == ["a", "", "ñ", "b", "", "", "€"]
    assert decoder.flush() == ""


def test_plain_export_loads_in_plain_pytorch(cli, char_run, tmp_path):
    out = tmp_path / "export"
    rc, _, err = cli("export", char_run, out)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_meta.json",
    ]
    config = json.loads((out / "config.json").read_text())
    model = moe_models.build(moe_models.config_from_dict(config["model"]))
    safetensors.torch.load_model(model, out / "model.safetensors")
    tokens = torch.randint(0, config["model"]["vocab_size"], (2, 12))
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens).logits, checkpoint_model(char_run)(tokens).logits)
    assert config["source"]["step"] == 2 and config["source"]["data"] is None
    rc, _, err = cli("export", char_run, out)
    cli.assert_one_line_error(rc, err, str(out), "not an empty folder")
    # an export is read like a run
    rc, text, err = cli("generate", out, "--prompt", "And", "--max-new-tokens", "6", "--greedy")
    assert rc == 0, err
    rc, ref, _ = cli("generate", char_run, "--prompt", "And", "--max-new-tokens", "6", "--greedy")
    assert text == ref


@pytest.mark.parametrize("preset", ["tiny-sigma-moe", "tiny-gshard", "tiny-smlp"])
def test_hf_export_loads_with_auto_classes(cli, tmp_path, preset):
    transformers = pytest.importorskip("transformers")
    import moe_models.hf

    options = {"tiny-sigma-moe": ["n_experts=4", "expert_size=16"], "tiny-gshard": []}
    options["tiny-gshard"] = ["n_experts=4", "expert_size=16", "tie_embeddings=true"]
    options["tiny-smlp"] = ["n_experts=4", "expert_size=16", "smlp_d_ff=32"]
    run = train(tmp_path / "run", "--preset", preset, *options[preset])
    out = tmp_path / "hf"
    rc, _, err = cli("export", run, out, "--format", "hf")
    assert rc == 0, err
    moe_models.hf.register()
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = checkpoint_model(run)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    vocab = moe_data.load_tokenizer(run / "tokenizer.json")
    text = "And God said, Let there be light"
    assert tokenizer(text)["input_ids"] == vocab.encode(text).tolist()
    assert (
        transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]
        == vocab.encode(text).tolist()
    )
    prompt = torch.tensor([vocab.encode(text).tolist()])  # longer than seq_len 16
    with torch.no_grad():
        assert torch.equal(model(prompt[:, :16]).logits, ours(prompt[:, :16]).logits)
    got = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, moe_models.generate(ours, prompt, 8, greedy=True))
    # moe-train reads the Hugging Face export too
    rc, out_text, err = cli("generate", out, "--prompt", text, "--max-new-tokens", "8", "--greedy")
    assert rc == 0, err
    assert out_text == vocab.decode(got[0].tolist()) + "\n"


def test_version_and_bare_command(cli, capsys):
    import moe_train

    rc, out, _ = cli("--version")
    assert rc == 0 and out.strip() == f"moe-train {moe_train.__version__}"
    rc, out, _ = cli()
    assert rc == 0 and "usage: moe-train" in out and "generate" in out and "export" in out
    assert sys.modules["moe_train"].__version__ == moe_train.__version__
