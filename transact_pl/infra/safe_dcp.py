"""Distributed (FSDP2) checkpoint directories, read without ever unpickling code.

torch.distributed.checkpoint reads a directory's ``.metadata`` (and, when that fails, per-rank
``__<rank>.metadata`` files) with plain ``pickle``, and its non-tensor items with an unrestricted
``torch.load`` that can run code. Here instead:

- ``.metadata`` is read once, by a pure-Python unpickler that resolves only the format's own record types
  by exact name (no dotted names, no modules) and refuses ``BUILD`` on anything but a record instance;
  the result is then checked field by field (types, and every storage record naming a plain file of
  this directory, no transforms);
- every non-tensor item and ``meta.pt`` must load under ``weights_only=True``;
- loading goes through :class:`CheckedReader`, which hands torch the metadata already checked (nothing is
  read twice), and :class:`WeightsOnlyLoadPlanner`, whose non-tensor loads are weights-only.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
    _MEM_FORMAT_ENCODING,
)

from transact_pl.errors import ConfigError, first_line
from transact_pl.infra.safe_load import (
    is_weights_only_refusal,
    reason,
    refusal,
    refused_global,
    weights_only_load,
    load_checkpoint_file,
)

METADATA_FILE = ".metadata"
META_FILE = "meta.pt"  # Lightning's non-tensor state of a distributed checkpoint (loops, callbacks, plans)

_DTYPE_NAMES = {name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}
# Every name .metadata may resolve, by exact (module, name): building any of them from crafted arguments
# builds data and nothing else.
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", cls.__name__): cls
    for cls in (Metadata, MetadataIndex, TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata,
                TensorProperties, StorageMeta, _MEM_FORMAT_ENCODING)
}
_ALLOWED.update({
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): Path,
    ("pathlib", "PurePosixPath"): Path,
    ("collections", "OrderedDict"): dict,
})
_RECORD_TYPES = tuple(cls for cls in _ALLOWED.values() if isinstance(cls, type) and cls.__module__.startswith("torch.distributed"))


class _MetadataUnpickler(pickle._Unpickler):
    """Pure-Python unpickler (so single opcodes can be refused) resolving only :data:`_ALLOWED`."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name and (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"a reference to {module}.{name}")

    def load_build(self) -> None:
        # BUILD sets attributes of the object below it; only record instances may be built (never a class).
        if not isinstance(self.stack[-2], _RECORD_TYPES):
            raise pickle.UnpicklingError(f"state set on {type(self.stack[-2]).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


@dataclass
class CheckedCheckpoint:
    """A distributed checkpoint directory whose metadata, non-tensor items and meta.pt were checked."""

    directory: Path
    metadata: Metadata
    meta: dict  # meta.pt: Lightning's loops, callbacks, hyper-parameters and checkpoint["transact"]


def read_metadata(directory: Path, option: str) -> Metadata:
    """``.metadata`` through the restricted unpickler, then checked field by field."""
    metadata_file = directory / METADATA_FILE
    if not metadata_file.is_file() or metadata_file.is_symlink():
        raise ConfigError(f"`{option}={directory}` is a directory without {METADATA_FILE}: not a distributed "
                          "checkpoint written by train.py; give a .ckpt file or an FSDP2 checkpoint directory")
    try:
        with open(metadata_file, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except pickle.UnpicklingError as error:
        text = str(error)
        detail = text if text.startswith(("a reference", "state set")) else "data that is not checkpoint metadata"
        raise refusal(metadata_file, option, detail) from error
    except Exception as error:  # truncated or foreign bytes
        raise ConfigError(f"`{option}={directory}` has an unreadable {METADATA_FILE} ({first_line(error, sentence=True, limit=200)}); "
                          "it may be truncated: give another checkpoint") from error
    problem = _metadata_problem(metadata, directory)
    if problem:
        raise ConfigError(f"`{option}={directory}` has a {METADATA_FILE} that this project never writes ({problem}); "
                          "give a checkpoint directory written by train.py")
    return metadata


def _metadata_problem(metadata: object, directory: Path) -> str | None:
    if not isinstance(metadata, Metadata):
        return f"a {type(metadata).__name__}, not checkpoint metadata"
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        return "no state or storage records"
    if metadata.storage_meta is not None and not isinstance(metadata.storage_meta, StorageMeta):
        return "a storage record of the wrong type"
    for fqn, item in metadata.state_dict_metadata.items():
        if not isinstance(fqn, str) or not isinstance(item, (TensorStorageMetadata, BytesStorageMetadata)):
            return f"an entry of the wrong type ({fqn!r})"
    for index, info in metadata.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            return "a storage record of the wrong type"
        if info.transform_descriptors:
            return f"an encoded item ({index.fqn})"
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0 and info.length >= 0):
            return f"a storage record with offset {info.offset!r} and length {info.length!r}"
        name = str(info.relative_path)
        file = directory / name
        if "/" in name or "\\" in name or name in ("", ".", "..") or file.is_symlink() or not file.is_file():
            return f"a storage record naming {name!r}, not a file of this directory"
    return None


def check_distributed_checkpoint(directory: str | Path, option: str = "--ckpt_path") -> CheckedCheckpoint:
    """Prove a distributed checkpoint directory safe to load; raises a one-line ``ConfigError`` otherwise."""
    directory = Path(directory)
    metadata = read_metadata(directory, option)
    byte_items = {fqn for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
    for index, info in metadata.storage_data.items():
        if index.fqn in byte_items:
            _check_byte_item(directory, info, option)
    meta_file = directory / META_FILE
    if meta_file.is_symlink():
        raise ConfigError(f"`{option}={directory}` has a {META_FILE} that is a symbolic link; give a checkpoint written by train.py")
    return CheckedCheckpoint(directory, metadata, load_checkpoint_file(meta_file, option))


def _check_byte_item(directory: Path, info: _StorageInfo, option: str) -> None:
    """Load one non-tensor item with ``weights_only=True`` (only to check it)."""
    try:
        with open(directory / str(info.relative_path), "rb") as handle:
            handle.seek(info.offset)
            weights_only_load(io.BytesIO(handle.read(info.length)))
    except Exception as error:
        if is_weights_only_refusal(error):
            raise refusal(directory, option, refused_global(error)) from error
        raise ConfigError(f"`{option}={directory}` has an unreadable item in {info.relative_path} "
                          f"({reason(error)}); it may be truncated: give another checkpoint") from error


class CheckedReader(FileSystemReader):
    """torch's file reader that never unpickles metadata: it returns the metadata already checked."""

    def __init__(self, checked: CheckedCheckpoint) -> None:
        super().__init__(checked.directory)
        self._checked = checked.metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._checked.storage_meta is None:
            self._checked.storage_meta = StorageMeta()
        self._checked.storage_meta.load_id = self.load_id
        return self._checked


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """torch's load planner whose non-tensor items are read with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        weights_only_load(value)  # raises on anything beyond tensors and plain values
        value.seek(0)
        super().load_bytes(read_item, value)


def load_distributed(state: dict, checked: CheckedCheckpoint, no_dist: bool = False) -> None:
    """``torch.distributed.checkpoint.load`` of ``state`` from a checked directory (in place)."""
    from torch.distributed.checkpoint import load

    load(state, storage_reader=CheckedReader(checked), planner=WeightsOnlyLoadPlanner(), no_dist=no_dist)
