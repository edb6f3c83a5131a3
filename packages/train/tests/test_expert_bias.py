"""The aux-loss-free expert bias in `moe-train train`: updated after every optimiser step,
logged with the routing statistics, and resumed bit-exactly."""

import torch
from moe_train import checkpoint as ckpt

# tiny-deepseek at the tests' tiny size: 4 experts in 2 groups, top-2 within the best group; a
# large rate, so that the bias moves visibly in a few steps
DEEPSEEK = ["k=2", "n_groups=2", "topk_groups=1", "bias_update_rate=0.01"]


def biases(run) -> dict[str, torch.Tensor]:
    model = ckpt.load(ckpt.latest(run))["model"]
    return {k: v for k, v in model.items() if k.endswith("router.expert_bias")}


def test_the_bias_is_updated_logged_and_resumed_bit_exactly(cli, tmp_path):
    common = [
        "--max-steps",
        "6",
        "--grad-accum",
        "2",
        "dropout=0.1",
        "train.save_interval=2",
        "train.routing_interval=2",
        *DEEPSEEK,
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    rc, _, err = cli.train(straight, *common, preset="tiny-deepseek")
    assert rc == 0, err
    assert cli.train(split, *common, "--stop-at", "3", preset="tiny-deepseek")[0] == 0
    rc, _, err = cli("train", "--out", split, "--resume", "--no-progress", "--no-tensorboard")
    assert rc == 0, err
    assert cli.losses(split) == cli.losses(straight)
    final, resumed = biases(straight), biases(split)
    assert final and final.keys() == resumed.keys()
    for name, bias in final.items():
        assert torch.equal(bias, resumed[name]), name
        assert bias.abs().max() > 0 and abs(float(bias.mean())) < 1e-6
    routing = [r["routing"] for r in cli.metrics(straight) if "routing" in r]
    assert len(routing) == 3
    for layer in routing[-1].values():
        assert len(layer["expert_bias"]) == len(layer["usage"]) == 4
    assert any(any(b != 0 for b in layer["expert_bias"]) for layer in routing[-1].values())
