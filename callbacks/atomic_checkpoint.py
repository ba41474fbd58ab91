"""AtomicCheckpointIO: a checkpoint file is either the previous complete one or the new complete one.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction that, on a local disk, stages the
bytes in the system temp directory and then *moves* them into place (a copy when /tmp is another
filesystem) without fsync, so a kill or a power cut can leave a truncated ``last.ckpt``. This plugin
writes ``<path>.tmp`` next to the target, fsyncs it, renames it over the target with ``os.replace``
(atomic on POSIX) and fsyncs the directory. Loading turns a missing, truncated or corrupted file into
a one-line ``ConfigError`` naming ``--ckpt_path``. Enable it in a config with::

    trainer:
      plugins:
        - class_path: callbacks.atomic_checkpoint.AtomicCheckpointIO

``save_last: link`` (``last.ckpt`` a symlink to the newest step checkpoint instead of a second copy) needs
``AtomicModelCheckpoint``: Lightning's ``ModelCheckpoint`` removes the old link before it makes the new one (a kill
in between leaves no ``last.ckpt``) and, where a symlink fails, copies the file without any of the above.

FSDP2 (Lightning's ``ModelParallelStrategy``) writes distributed checkpoint *directories* without any
CheckpointIO; ``AtomicModelParallelStrategy`` is that strategy with the same guarantee for them: every rank
writes its shards into ``<path>.tmp/``, and once all have finished, rank 0 fsyncs and renames it into place.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from callbacks.run_guard import interruption_behind, stops_deferred
from transact_pl.errors import ConfigError, first_line
from transact_pl.infra.safe_dcp import check_distributed_checkpoint, load_distributed

STAGING_SUFFIX = ".tmp"


def _is_local(path: str | Path) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_torch_save(payload: Any, path: str | Path) -> None:
    """``torch.save(payload, path)`` through ``<path>.tmp`` + fsync + ``os.replace``; no partial ``path`` ever.

    torch.save is given the staging *path*, so its zip writer writes through its own C++ file: no Python file
    object that an exception could close under it.
    """
    atomic_write(path, lambda staging: torch.save(payload, staging))


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(staging)`` creates ``<path>.tmp``; it is fsynced and renamed onto ``path`` with ``os.replace``; on any
    failure no staging file is left.

    A stop signal that arrives meanwhile takes effect once ``path`` is complete (:func:`stops_deferred`). Should
    one still be raised inside the write and the writer fail in turn over it (``torch.save``'s zip writer raises
    its own "unexpected pos ..." over an interrupted record), the interruption, not that consequence, is what
    propagates, so the run stops with its resume line.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + STAGING_SUFFIX)
    try:
        with stops_deferred():
            write(staging)
            descriptor = os.open(staging, os.O_RDONLY)
            try:
                os.fsync(descriptor)  # (Linux flushes the file's pages whatever descriptor asks)
            finally:
                os.close(descriptor)
            os.replace(staging, target)
            _fsync_directory(target.parent)
    except BaseException as error:
        staging.unlink(missing_ok=True)
        interruption = interruption_behind(error)
        if interruption is not None and interruption is not error:
            raise interruption from None
        raise


class AtomicModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``save_last: link`` replaces ``last.ckpt`` in one step: the new link is
    made as ``last.ckpt.tmp`` and renamed over the old one, so at every moment ``last.ckpt`` exists and points at a
    whole checkpoint (the step file it names was written atomically and saved before the link). Where symlinks
    cannot be made, the file (an FSDP2 checkpoint directory: the directory) is copied atomically instead."""

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            link = Path(linkpath)
            staging = link.with_name(link.name + STAGING_SUFFIX)
            remove_path(staging)  # a link, file or directory copy left by a run killed while relinking
            try:
                os.symlink(os.path.relpath(filepath, link.parent), staging)
            except OSError:  # no symlinks on this filesystem: a whole copy, written atomically
                if os.path.isdir(filepath):  # an FSDP2 checkpoint directory
                    shutil.copytree(filepath, staging)
                    replace_directory(staging, link)
                else:
                    atomic_write(link, lambda staging: shutil.copyfile(filepath, staging))
            else:
                if link.is_dir() and not link.is_symlink():  # a directory saved as last before (FSDP2, or a copy)
                    replace_directory(staging, link)
                else:
                    os.replace(staging, link)
                    _fsync_directory(link.parent)
        trainer.strategy.barrier()


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and whose load errors name ``--ckpt_path``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote stores: fsspec's own transaction
            return
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if _is_local(path) and not Path(str(path).removeprefix("file://")).is_file():
            raise ConfigError(f"`--ckpt_path={path}` does not exist; give a .ckpt written by train.py (or `last`)")
        try:  # weights_only always: a checkpoint file must never be able to run code when it is read
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except UNREADABLE as error:
            raise unreadable_checkpoint(path, error) from error


# What torch.load raises on a truncated or overwritten file.
UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)


def unreadable_checkpoint(path: str | Path, error: BaseException) -> ConfigError:
    """The one-line error for a checkpoint file torch cannot read."""
    return ConfigError(f"`--ckpt_path={path}` is truncated or corrupted ({first_line(error, sentence=True)}); resume from an earlier checkpoint "
                       "of the run (AtomicCheckpointIO writes every .ckpt whole, so the previous one is intact)")


def replace_directory(staging: Path, target: Path) -> None:
    """Move a finished ``staging`` directory to ``target``, durably; an older ``target`` is set aside first.

    Directories cannot be renamed over non-empty ones, so an existing target goes to ``<target>.old`` for the
    moment between the two renames and is deleted after. A complete copy exists at every instant: ``target``,
    or (killed between the renames) ``<target>.old``, which :func:`finish_interrupted_replace` puts back.
    """
    for file in staging.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_directory(staging)
    previous = target.with_name(target.name + ".old")
    if target.is_dir():  # (or a link to one: ``last.ckpt`` before symlinks stopped working)
        remove_path(previous)  # a leftover; target is the complete copy
        os.replace(target, previous)
    elif target.exists():
        target.unlink()
    os.replace(staging, target)
    _fsync_directory(target.parent)
    try:
        remove_path(previous)
    except OSError:
        pass  # the new copy is in place; a stale <target>.old goes at the next replace


def remove_path(path: Path) -> None:
    """Delete a file, a symlink (not what it points at) or a directory tree; nothing when absent."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def finish_interrupted_replace(target: str | Path) -> None:
    """Put ``<target>.old`` back when a save was killed between the two renames of :func:`replace_directory`.

    Safe to call from every process of a launch at once: the rename happens once, the others find it done.
    """
    target = Path(str(target).removeprefix("file://"))
    previous = target.with_name(target.name + ".old")
    if not target.exists() and previous.is_dir():
        try:
            os.replace(previous, target)
        except FileNotFoundError:
            pass  # another process of this launch has just done it


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2) whose distributed checkpoint directories land whole or not at all."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint or not _is_local(filepath):
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        target = Path(self.broadcast(str(filepath).removeprefix("file://")))
        staging = target.with_name(target.name + STAGING_SUFFIX)
        if self.global_rank == 0 and staging.exists():
            shutil.rmtree(staging)  # left by a run killed mid-save
        self.barrier("atomic_checkpoint_clean")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("atomic_checkpoint_written")  # every rank's shards and rank 0's meta.pt are on disk
        if self.global_rank == 0:
            replace_directory(staging, target)
        self.barrier("atomic_checkpoint_moved")

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint file weights-only, or a checkpoint directory checked whole and read without unpickling.

        Every resume passes here (``--ckpt_path``, ``last``, SLURM's automatic ``hpc`` resume). A directory goes
        through ``transact_pl.infra.safe_dcp``: its metadata is read once by the restricted reader and its non-tensor
        items weights-only, where Lightning would let torch.distributed.checkpoint unpickle them.
        """
        path = Path(self.broadcast(str(checkpoint_path).removeprefix("file://")))
        if not path.is_dir():
            return super().load_checkpoint(path, weights_only=True)
        checked = check_distributed_checkpoint(path)
        module = self.lightning_module
        model_state = {"state_dict": get_model_state_dict(module)}
        load_distributed(model_state, checked)
        module.load_state_dict(model_state["state_dict"], strict=module.strict_loading)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
            load_distributed(optimizer_state, checked)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return checked.meta
