"""What a newcomer meets in the first hour: the validation a run makes along the way is printed,
and every `uv run` command of the READMEs names the extra it needs the way uv takes it (an extra
the workspace root defines)."""

import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
READMES = [ROOT / "README.md", *sorted((ROOT / "packages").glob("*/README.md"))]
# what a command needs beyond the default environment
NEEDS = [
    (lambda argv: "export" in argv and "--format" in argv and "hf" in argv, "hf"),
    (lambda argv: "lm-eval" in argv, "eval"),
]


def uv_commands():
    for readme in READMES:
        text = readme.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip().lstrip("`")
            if line.startswith("uv run "):
                yield readme.relative_to(ROOT), shlex.split(line.split("#")[0].split("`")[0])


COMMANDS = list(uv_commands())


def test_the_readmes_show_uv_commands():
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("readme, argv", COMMANDS, ids=[" ".join(a)[:70] for _, a in COMMANDS])
def test_every_uv_command_names_the_extra_it_needs_as_uv_takes_it(readme, argv):
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(root["project"].get("optional-dependencies", {}))
    named = {argv[i + 1] for i, a in enumerate(argv) if a == "--extra"}
    assert named <= extras, (readme, argv, extras)
    assert "--frozen" in argv, (readme, argv)
    for needs, extra in NEEDS:
        if needs(argv):
            assert extra in named, (readme, argv, extra)


def test_the_root_extras_are_the_packages_extras():
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    train = tomllib.loads((ROOT / "packages/train/pyproject.toml").read_text())["project"]
    for name, deps in root.items():
        assert name in train["optional-dependencies"], name
        assert any(d.startswith(("moe-train[", "moe-models[")) for d in deps), (name, deps)


def test_the_validation_along_the_way_is_printed(cli, tmp_path):
    rc, out, err = cli.train(tmp_path / "r", "--max-steps", "4", "--eval-interval", "2")
    assert rc == 0, err
    assert re.search(
        r"^step 2: validation bpc \d+\.\d{4} \(loss \d+\.\d{4} nats/token\)$", out, re.M
    )
    assert re.search(r"^step 4: validation bpc", out, re.M)


def test_a_replaced_vocab_size_is_said(cli, tmp_path):
    rc, _, err = cli.train(tmp_path / "r", "--max-steps", "1", "vocab_size=1000")
    assert rc == 0, err
    assert "note: vocab_size=1000 is replaced by the data's vocabulary of" in err
    rc, _, err = cli.train(tmp_path / "plain", "--max-steps", "1")
    assert rc == 0 and "vocab_size" not in err, err


def test_resume_says_that_a_hand_edited_config_is_not_what_it_continues(cli, tmp_path):
    import json

    run = tmp_path / "r"
    rc, _, err = cli.train(run, "--max-steps", "2")
    assert rc == 0, err
    config = json.loads((run / "config.json").read_text())
    config["train"]["lr"] = 0.5
    (run / "config.json").write_text(json.dumps(config))
    rc, _, err = cli("train", "--out", run, "--resume", "--max-steps", "3", "--no-progress")
    assert rc == 0, err
    assert f"note: {run / 'config.json'} differs from the config in the checkpoint" in err
    assert json.loads((run / "config.json").read_text())["train"]["lr"] != 0.5
    rc, _, err = cli("train", "--out", run, "--resume", "--max-steps", "4", "--no-progress")
    assert rc == 0 and "differs" not in err, err
