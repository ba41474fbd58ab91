"""Reading checkpoints that users hand us without running any code stored in them.

A pickle can name any importable callable and have it called on load. Every checkpoint a user gives us
(``--ckpt_path``, ``python -m transact_pl.infra.export_checkpoint``) is therefore read with
``torch.load(..., weights_only=True)``, which only rebuilds tensors and plain containers.

Distributed (FSDP2) checkpoint directories need more care, and get it in ``transact_pl.infra.safe_dcp``.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from transact_pl.errors import ConfigError, first_line


class UnsafeCheckpointError(ConfigError):
    """A checkpoint holds something that a weights-only reader refuses (possibly code to run)."""


def refusal(path: Path, option: str, detail: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"`{option}={path}` holds {detail}, which is never loaded (it could run code); give a file of tensors and "
        "plain values only (as train.py and save_pretrained write them)"
    )


def is_weights_only_refusal(error: BaseException) -> bool:
    """torch's weights-only reader refused a reference to a callable (not merely bytes it cannot parse)."""
    return isinstance(error, pickle.UnpicklingError) and re.search(r"GLOBAL [\w.]+", str(error)) is not None


def reason(error: BaseException) -> str:
    """The informative line of a torch.load failure (the weights-only reader's own reason when there is one)."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|Check the documentation|$)", str(error), re.S)
    return " ".join(found.group(1).split())[:200] if found else first_line(error, sentence=True, limit=200)


def load_checkpoint_file(path: str | Path, option: str = "--ckpt_path", mmap: bool = False) -> dict:
    """``torch.load`` a single-file checkpoint with ``weights_only=True``, on the CPU.

    Raises ``UnsafeCheckpointError`` for a file that needs more than tensors and plain values and
    ``ConfigError`` for a missing, truncated or foreign file; both as one line naming ``option``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"`{option}={path}` does not exist or is not a file; give a .ckpt written by train.py")
    try:
        checkpoint = weights_only_load(path, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as error:  # torch.load raises many types for foreign bytes; each becomes one line
        if is_weights_only_refusal(error):
            raise refusal(path, option, refused_global(error)) from error
        raise ConfigError(f"`{option}={path}` is truncated or corrupted, or not a checkpoint ({reason(error)}); give "
                          "another one (AtomicCheckpointIO writes every .ckpt whole: the run's previous one is intact)") from error
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"`{option}={path}` is not a checkpoint written by train.py (it holds a "
                          f"{type(checkpoint).__name__}, not a dict); give another one")
    return checkpoint


def weights_only_load(source: Path | io.BytesIO, mmap: bool = False) -> object:
    with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files; the refusal says enough
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)


def refused_global(error: BaseException) -> str:
    """'a reference to posix.system' from torch's weights-only refusal, or a generic description."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return f"a reference to {found.group(1) if found else 'a callable'}"


def is_distributed_checkpoint(path: str | Path) -> bool:
    """A directory written by torch.distributed.checkpoint (FSDP2 checkpoints of ModelParallelStrategy)."""
    return Path(path).is_dir()


def load_checkpoint_metadata(path: str | Path, option: str = "--ckpt_path") -> dict:
    """The non-tensor part of any checkpoint written by train.py: a ``.ckpt`` file or an FSDP2 directory.

    Directories are checked whole first (``transact_pl.infra.safe_dcp.check_distributed_checkpoint``).
    """
    if is_distributed_checkpoint(path):
        from transact_pl.infra.safe_dcp import check_distributed_checkpoint

        return check_distributed_checkpoint(path, option).meta
    return load_checkpoint_file(path, option, mmap=True)
