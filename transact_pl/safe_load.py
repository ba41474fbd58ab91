"""Reading checkpoints that users hand us without running any code stored in them.

A pickle can name any importable callable and have it called on load. Every checkpoint a user gives us
(``--ckpt_path``, ``python -m transact_pl.export_checkpoint``) is therefore read with
``torch.load(..., weights_only=True)``, which only rebuilds tensors and plain containers.

Distributed (FSDP2) checkpoint directories need more care: torch.distributed.checkpoint reads their
``.metadata`` with plain ``pickle`` and their non-tensor items with ``torch.load(weights_only=False)``.
:func:`check_distributed_checkpoint` proves, before anything else touches such a directory, that
``.metadata`` names only the checkpoint format's own record types and that every non-tensor item and
``meta.pt`` load under ``weights_only=True``; after that the library's own readers can only rebuild what
those restricted readers already accepted.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from transact_pl.errors import ConfigError

DCP_METADATA_FILE = ".metadata"
DCP_META_FILE = "meta.pt"  # Lightning's non-tensor state of a distributed checkpoint (loops, callbacks, plans)

# What the .metadata pickle of a torch.distributed.checkpoint directory may name: its record types, dtypes,
# torch.Size, the layout lookup and a path. Calling any of them with crafted arguments builds data, nothing else.
_DCP_RECORD_MODULES = {"torch.distributed.checkpoint.metadata"}
_DCP_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(ConfigError):
    """A checkpoint holds something that a weights-only reader refuses (possibly code to run)."""


def _refusal(path: Path, option: str, detail: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"`{option}={path}` holds {detail}, which is never loaded (it could run code); give a file of tensors and "
        "plain values only (as train.py and save_pretrained write them)"
    )


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickler for ``.metadata`` that resolves only the checkpoint format's own names."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_RECORD_MODULES or (module, name) in _DCP_ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"a reference to {module}.{name}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else type(error).__name__


def _is_weights_only_refusal(error: BaseException) -> bool:
    """torch's weights-only reader refused a reference to a callable (not merely bytes it cannot parse)."""
    return isinstance(error, pickle.UnpicklingError) and re.search(r"GLOBAL [\w.]+", str(error)) is not None


def _reason(error: BaseException) -> str:
    """The informative line of a torch.load failure (the weights-only reader's own reason when there is one)."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|Check the documentation|$)", str(error), re.S)
    return " ".join(found.group(1).split())[:200] if found else _first_line(error)


def load_checkpoint_file(path: str | Path, option: str = "--ckpt_path", mmap: bool = False) -> dict:
    """``torch.load`` a single-file checkpoint with ``weights_only=True``, on the CPU.

    Raises ``UnsafeCheckpointError`` for a file that needs more than tensors and plain values and
    ``ConfigError`` for a missing, truncated or foreign file; both as one line naming ``option``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"`{option}={path}` does not exist or is not a file; give a .ckpt written by train.py")
    try:
        checkpoint = _weights_only_load(path, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as error:  # torch.load raises many types for foreign bytes; each becomes one line
        if _is_weights_only_refusal(error):
            raise _refusal(path, option, _refused_global(error)) from error
        raise ConfigError(f"`{option}={path}` is truncated or corrupted, or not a checkpoint ({_reason(error)}); give "
                          "another one (AtomicCheckpointIO writes every .ckpt whole: the run's previous one is intact)") from error
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"`{option}={path}` is not a checkpoint written by train.py (it holds a "
                          f"{type(checkpoint).__name__}, not a dict); give another one")
    return checkpoint


def _weights_only_load(source: Path | io.BytesIO, mmap: bool = False) -> object:
    with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files; the refusal says enough
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)


def _refused_global(error: BaseException) -> str:
    """'a reference to posix.system' from torch's weights-only refusal, or a generic description."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return f"a reference to {found.group(1) if found else 'a callable'}"


def is_distributed_checkpoint(path: str | Path) -> bool:
    """A directory written by torch.distributed.checkpoint (FSDP2 checkpoints of ModelParallelStrategy)."""
    return Path(path).is_dir()


def read_dcp_metadata(directory: str | Path, option: str = "--ckpt_path"):
    """The ``Metadata`` record of a distributed checkpoint, read with the restricted unpickler."""
    directory = Path(directory)
    metadata_file = directory / DCP_METADATA_FILE
    if not metadata_file.is_file():
        raise ConfigError(f"`{option}={directory}` is a directory without {DCP_METADATA_FILE}: not a distributed "
                          "checkpoint written by train.py; give a .ckpt file or an FSDP2 checkpoint directory")
    try:
        with open(metadata_file, "rb") as handle:
            return _DcpMetadataUnpickler(handle).load()
    except pickle.UnpicklingError as error:
        detail = str(error) if str(error).startswith("a reference") else "data that is not checkpoint metadata"
        raise _refusal(directory / DCP_METADATA_FILE, option, detail) from error
    except Exception as error:
        raise ConfigError(f"`{option}={directory}` has an unreadable {DCP_METADATA_FILE} ({_first_line(error)}); "
                          "it may be truncated: give another checkpoint") from error


def check_distributed_checkpoint(directory: str | Path, option: str = "--ckpt_path") -> dict:
    """Prove a distributed checkpoint directory safe to hand to torch.distributed.checkpoint; return meta.pt.

    Checks ``.metadata`` (restricted unpickler), every non-tensor item (``weights_only=True``) and
    ``meta.pt`` (``weights_only=True``); raises a one-line ``ConfigError``/``UnsafeCheckpointError``.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    directory = Path(directory)
    metadata = read_dcp_metadata(directory, option)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise ConfigError(f"`{option}={directory}` has {DCP_METADATA_FILE} without storage records; give another checkpoint")
    byte_items = {fqn for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
    for index, info in storage.items():
        if getattr(info, "transform_descriptors", None):
            raise _refusal(directory, option, f"an encoded item ({index.fqn})")
        if index.fqn in byte_items:
            _check_byte_item(directory, info, option)
    return load_checkpoint_file(directory / DCP_META_FILE, option)


def _check_byte_item(directory: Path, info, option: str) -> None:
    """Load one non-tensor item of a distributed checkpoint with ``weights_only=True`` (it is only checked here)."""
    file = (directory / str(info.relative_path)).resolve()
    if file.parent != directory.resolve():
        raise _refusal(directory, option, f"a storage record pointing outside the directory ({info.relative_path})")
    try:
        with open(file, "rb") as handle:
            handle.seek(int(info.offset))
            payload = handle.read(int(info.length))
        _weights_only_load(io.BytesIO(payload))
    except Exception as error:
        if _is_weights_only_refusal(error):
            raise _refusal(directory, option, _refused_global(error)) from error
        raise ConfigError(f"`{option}={directory}` has an unreadable item in {info.relative_path} "
                          f"({_reason(error)}); it may be truncated: give another checkpoint") from error


def load_checkpoint_metadata(path: str | Path, option: str = "--ckpt_path") -> dict:
    """The non-tensor part of any checkpoint written by train.py: a ``.ckpt`` file or an FSDP2 directory.

    Directories are checked whole (:func:`check_distributed_checkpoint`) first.
    """
    if is_distributed_checkpoint(path):
        return check_distributed_checkpoint(path, option)
    return load_checkpoint_file(path, option, mmap=True)
