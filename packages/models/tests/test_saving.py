"""save_pretrained / load_pretrained: model.safetensors + config.json rebuild the same model, and
the plain-PyTorch recipe of the module docstring loads it too."""

import json

import moe_models
import pytest
import safetensors.torch
import torch
from moe_models.config import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [False, True])
def test_saved_model_rebuilds_with_equal_logits(small, tmp_path, arch, tied):
    model = small(arch, "hash" if arch == "decoder" else "sigma_moe", 1, tie_embeddings=tied)
    model.eval()
    moe_models.save_pretrained(model, tmp_path, plugins=[], note="kept")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["note"] == "kept" and config["arch"] == arch
    tokens = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(3))
    expected = model(tokens).logits
    loaded = moe_models.load_pretrained(tmp_path)
    assert not loaded.training
    assert torch.equal(loaded(tokens).logits, expected)
    assert (loaded.head.weight is loaded.embedding.weight) == tied
    # the recipe: nothing of moe_models.saving
    rebuilt = moe_models.build(moe_models.config_from_dict(config["model"]))
    safetensors.torch.load_model(rebuilt, tmp_path / "model.safetensors")
    assert torch.equal(rebuilt.eval()(tokens).logits, expected)


def test_tied_weights_are_stored_once(small, tmp_path):
    model = small("decoder", "dense", 0, tie_embeddings=True)
    moe_models.save_pretrained(model, tmp_path)
    names = safetensors.torch.load_file(tmp_path / "model.safetensors").keys()
    assert ("embedding.weight" in names) != ("head.weight" in names)


def test_loading_names_what_is_wrong(small, tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        moe_models.load_pretrained(tmp_path)
    moe_models.save_pretrained(small("smlp", "tmoe", 0), tmp_path)
    other = tmp_path / "other"
    moe_models.save_pretrained(small("smlp", "tmoe", 0, d_model=16), other)
    (tmp_path / "model.safetensors").replace(other / "model.safetensors")
    with pytest.raises(ValueError, match="does not fit|size mismatch"):
        moe_models.load_pretrained(other)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["ffn"]["type"] = "no-such-layer"
    config["plugins"] = ["my_layers.py"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="my_layers.py"):
        moe_models.load_pretrained(tmp_path)
