"""train.expert_parallel on one process (a no-op) and its checks; the 2-process runs are in
test_cli_subprocess.py."""

import moe_models
import pytest
import torch
from moe_train.errors import CLIError
from moe_train.expert_parallel import shard_experts


def test_expert_parallel_on_one_process_is_a_no_op(cli, tmp_path):
    plain, ep = tmp_path / "plain", tmp_path / "ep"
    assert cli.train(plain, "--max-steps", "2")[0] == 0
    rc, _, err = cli.train(ep, "--max-steps", "2", "--expert-parallel")
    assert rc == 0, err
    assert cli.losses(ep) == cli.losses(plain)
    name = "checkpoints/step-00000002.pt"
    ref = torch.load(plain / name, weights_only=True)["model"]
    got = torch.load(ep / name, weights_only=True)["model"]
    assert list(got) == list(ref)


def test_experts_not_divisible_by_the_world_size_is_a_cli_error():
    model = moe_models.build(moe_models.get_config("tiny-sigma-moe", n_experts=3))
    with pytest.raises(CLIError, match="3 experts, not divisible by the world size 2"):
        shard_experts(model, 2)


def test_gated_experts_are_a_cli_error():
    cfg = moe_models.get_config("tiny-olmoe", n_layers=1, d_model=32, n_heads=2, expert_size=8)
    with pytest.raises(CLIError, match="w1, w2, w3 \\(activation 'swiglu'\\)"):
        shard_experts(moe_models.build(cfg), 2)
