"""moe_train.dcp_reader against DCP's own loading (the reference, sharing no code with it) on
folders DCP wrote: from one process over drawn shapes and dtypes, and sharded over two ranks
(uneven row and column shards, a replicated tensor); what it does not know falls back to DCP."""

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_train import checkpoint as ckpt
from moe_train import dcp_reader

HERE = Path(__file__).parent
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]


def dcp_read(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The reference: DCP's planner and reader fill tensors of the metadata's sizes."""
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    state = {
        key.removeprefix(prefix + "."): torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith(prefix + ".") and isinstance(item, dcp.metadata.TensorStorageMetadata)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({prefix: state}, checkpoint_id=str(folder), no_dist=True)
    return state


def dcp_write(folder: Path, state: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)


def assert_same(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


def tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g) * 100
    return values > 0 if dtype is torch.bool else values.to(dtype)


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@settings(max_examples=10)
@given(
    entries=st.lists(st.tuples(shapes, st.sampled_from(DTYPES)), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_one_process_folders_read_as_dcp_reads_them(tmp_path_factory, entries, seed):
    folder = tmp_path_factory.mktemp("dcp")
    model = {f"t{i}": tensor(shape, dtype, seed + i) for i, (shape, dtype) in enumerate(entries)}
    # the optimiser's entries sit beside the model's, some of them bytes (plain values)
    dcp_write(folder, {"model": model, "optimizer": {"lr": 0.1, "m": torch.ones(2)}})
    assert_same(dcp_reader.read_tensors(folder, "model"), dcp_read(folder, "model"))


def test_folders_sharded_over_two_ranks_read_as_dcp_reads_them(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = subprocess.run(
        [*launcher, "--nproc_per_node", "2", str(HERE / "dcp_shards_worker.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metadata = dcp_reader.read_metadata(tmp_path)
    chunks = {
        k: len(v.chunks) for k, v in metadata.state_dict_metadata.items() if k != "optimizer.step"
    }
    assert chunks["model.rows"] == 2 and chunks["model.columns"] == 2, chunks
    ours = dcp_reader.read_tensors(tmp_path, "model")
    assert_same(ours, dcp_read(tmp_path, "model"))
    # the worker's tensors, whole, as each rank built them
    assert torch.equal(ours["rows"], torch.arange(5 * 3, dtype=torch.float32).view(5, 3))
    assert torch.equal(ours["columns"], torch.arange(2 * 7).view(2, 7).to(torch.bfloat16))


def test_an_unknown_version_or_class_is_unfamiliar_and_dcp_reads_it(tmp_path):
    dcp_write(tmp_path, {"model": {"w": torch.arange(6.0)}})
    metadata = dcp.FileSystemReader(str(tmp_path)).read_metadata()
    metadata.version = "9.0.0"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(dcp_reader.Unfamiliar, match="version"):
        dcp_reader.read_tensors(tmp_path, "model")
    assert torch.equal(ckpt.read_tensors(tmp_path, "model")["w"], torch.arange(6.0))
    metadata.version = "1.0.0"
    metadata.storage_meta.modules = [os.path.join]  # a function: no part of DCP's metadata
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(dcp_reader.Unfamiliar, match="refers to"):
        dcp_reader.read_metadata(tmp_path)
    assert torch.equal(ckpt.read_tensors(tmp_path, "model")["w"], torch.arange(6.0))


class Runs:
    """Unpickling it would run code: `os.system` at load time."""

    def __reduce__(self):
        return (os.system, ("touch ran",))


def test_metadata_that_would_run_code_is_refused_unrun(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Runs()))
    with pytest.raises(dcp_reader.Unfamiliar, match="os.system|posix.system"):
        dcp_reader.read_metadata(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_a_chunk_that_is_not_the_described_tensor_is_unfamiliar(tmp_path):
    dcp_write(tmp_path, {"model": {"w": torch.arange(6.0)}})
    metadata = dcp.FileSystemReader(str(tmp_path)).read_metadata()
    metadata.state_dict_metadata["model.w"].properties.dtype = torch.float64
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(dcp_reader.Unfamiliar, match="not the tensor"):
        dcp_reader.read_tensors(tmp_path, "model")
