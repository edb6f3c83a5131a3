"""The tensors of a DCP checkpoint folder, read on one process without importing
torch.distributed.checkpoint: that package imports DTensor and with it sympy, about 2 s of CPU
time at the start of every command that only reads a model (`generate`, `eval`, `export`, ...).

A folder that DCP's FileSystemWriter wrote holds `.metadata` (a pickled `Metadata`: each tensor's
dtype, global size and chunks, and where each chunk lies) and `.distcp` files, in which each chunk
is a `torch.save`d tensor at an offset. `.metadata` is read by an unpickler that admits only the
classes DCP's metadata is made of (taken as plain records), torch's sizes and dtypes, and paths, so
it runs no code of the file; the chunks are read with `torch.load(weights_only=True)`.

Whatever this reader does not know (another class in `.metadata`, another DCP version, stream
transforms such as compression, chunks that do not fill their tensor) or cannot read (a missing,
short or corrupt file) raises `Unfamiliar`: the caller then reads the folder with DCP itself,
which also words the error of a damaged folder. tests/test_dcp_reader.py checks this reader
against DCP's loading on folders DCP wrote, from one process and sharded over two.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

METADATA = ".metadata"
# the `Metadata.version` values whose layout this reader knows (None: written before versions)
VERSIONS = (None, "1.0.0")

_DCP = "torch.distributed.checkpoint"


class Unfamiliar(Exception):
    """The folder is not one this reader can read; DCP's own loading should."""


class _Record:
    """A DCP metadata object as its pickled state: its fields (a dict), or `state` (a tuple:
    TensorProperties pickles as (dtype, layout, requires_grad, memory format, pin_memory[,
    strides]))."""

    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


_RECORDS = {
    (f"{_DCP}.{module}", name): type(name, (_Record,), {})
    for module, names in (
        (
            "metadata",
            (
                "Metadata",
                "TensorStorageMetadata",
                "TensorProperties",
                "ChunkStorageMetadata",
                "BytesStorageMetadata",
                "MetadataIndex",
                "StorageMeta",
            ),
        ),
        ("filesystem", ("_StorageInfo",)),
    )
    for name in names
}


def _arguments(*args):
    return args


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _RECORDS:
            return _RECORDS[module, name]
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        # a layout, a memory format's encoding, the checkpoint's path: unused, kept as arguments
        if (module, name) in (
            ("torch.serialization", "_get_layout"),
            (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"),
            ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"),
        ):
            return _arguments
        raise Unfamiliar(f"{METADATA} refers to {module}.{name}")


def _kind(record) -> str:
    return type(record).__name__


def read_metadata(folder: str | Path):
    """The folder's `.metadata` as records (`Unfamiliar`: not a DCP version this reader knows)."""
    try:
        with open(Path(folder) / METADATA, "rb") as f:
            metadata = _Unpickler(f).load()
    except Unfamiliar:
        raise
    except Exception as e:
        raise Unfamiliar(f"{METADATA} does not read: {e}") from e
    if _kind(metadata) != "Metadata" or getattr(metadata, "version", None) not in VERSIONS:
        raise Unfamiliar(f"{METADATA} is not a DCP Metadata of version {VERSIONS}")
    return metadata


def _dtype(properties) -> torch.dtype:
    state = getattr(properties, "state", None)
    dtype = state[0] if isinstance(state, tuple) and state else getattr(properties, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        raise Unfamiliar(f"a tensor's properties hold no dtype: {properties!r}")
    return dtype


def read_tensors(folder: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The whole tensors saved under `prefix.` (e.g. "model": the model's state dict), each
    assembled from its chunks, on the CPU."""
    folder = Path(folder)
    metadata = read_metadata(folder)
    try:
        # a MetadataIndex without an offset (a non-tensor entry) pickles without the field
        where = {
            (index.fqn, tuple(index.offset)): info
            for index, info in metadata.storage_data.items()
            if getattr(index, "offset", None) is not None
        }
        items = [
            (key, item)
            for key, item in metadata.state_dict_metadata.items()
            if key.startswith(prefix + ".") and _kind(item) == "TensorStorageMetadata"
        ]
    except (AttributeError, TypeError) as e:
        raise Unfamiliar(f"{METADATA} is not laid out as expected: {e}") from e
    files: dict[str, io.BufferedReader] = {}
    try:
        return {
            key.removeprefix(prefix + "."): _assemble(folder, key, item, where, files)
            for key, item in items
        }
    finally:
        for f in files.values():
            f.close()


def _assemble(folder: Path, key: str, item, where: dict, files: dict) -> torch.Tensor:
    dtype, size = _dtype(item.properties), torch.Size(item.size)
    chunks = []
    for chunk in item.chunks:
        info = where.get((key, tuple(chunk.offsets)))
        if info is None or getattr(info, "transform_descriptors", None):
            raise Unfamiliar(f"{key}: a chunk without a place or with stream transforms")
        t = _read_chunk(folder, info, files)
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.shape != chunk.sizes:
            raise Unfamiliar(f"{key}: a chunk that is not the tensor the metadata describes")
        chunks.append((chunk.offsets, t))
    # DCP's chunks do not overlap: they fill the tensor when their sizes add up to it
    filled = sum(t.numel() for _, t in chunks)
    if filled != size.numel():
        raise Unfamiliar(f"{key}: its chunks hold {filled} of {size.numel()} values")
    if len(chunks) == 1 and chunks[0][1].shape == size:
        return chunks[0][1]  # the whole tensor (a one-process checkpoint): no copy
    out = torch.empty(size, dtype=dtype)
    for offsets, t in chunks:
        out[tuple(slice(o, o + s) for o, s in zip(offsets, t.shape, strict=True))] = t
    return out


def _read_chunk(folder: Path, info, files: dict):
    name = info.relative_path
    if not isinstance(name, str) or Path(name).name != name:
        raise Unfamiliar(f"a chunk in {name!r}, outside the folder")
    try:
        if name not in files:
            files[name] = open(folder / name, "rb")
        f = files[name]
        f.seek(info.offset)
        data = f.read(info.length)
        if len(data) != info.length:
            raise Unfamiliar(f"{name} ends before the chunk at {info.offset}")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Unfamiliar:
        raise
    except Exception as e:
        raise Unfamiliar(f"{name} does not read: {e}") from e
