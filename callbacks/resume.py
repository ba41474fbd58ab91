"""Resuming a run, in the order the code runs (docs/architecture.md tells the same story).

1. ``checked_ckpt_parse`` (LightningCLI's ``--ckpt_path`` step): ``last`` becomes the newest ``last*.ckpt`` of
   the run's checkpoint directories; an FSDP2 directory whose save was killed mid-rename is put back
   (``atomic_checkpoint.finish_interrupted_replace``); the checkpoint's metadata is read weights-only (a
   directory is checked whole first); a checkpoint of another base model, or model options that differ from
   the ones it was written with, are refused in one line.
2. ``hand_checkpoint_to_trainer`` (``before_fit``): the path is given to the Trainer before ``configure_model``.
3. ``TransActLM.configure_model``: the base model is loaded, the checkpoint's plans (``checkpoint["transact"]``)
   are replayed so the pruned shapes exist, then the model is sharded under FSDP2.
4. Lightning loads the weights (``AtomicCheckpointIO`` / ``AtomicModelParallelStrategy``: weights-only, checked
   DCP metadata), then ``TransActLM.on_load_checkpoint`` checks the plans against those already applied.
5. Callback and data state: ``TransActPruning.on_fit_start`` refuses plans this configuration would not have
   made, ``PruningReport`` gets its measured stages back, the data stream continues at its consumed sample.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from callbacks.atomic_checkpoint import UNREADABLE, finish_interrupted_replace, unreadable_checkpoint
from transact_pl.errors import ConfigError
from transact_pl.infra.safe_load import load_checkpoint_metadata


WEIGHTS_ONLY_REFUSAL = ("`--weights_only=false` is not supported: checkpoints are always read with weights_only=True, "
                        "so a checkpoint cannot run code; those written by train.py need nothing more: drop the option")


def model_identity(config, subcommand: str) -> tuple:
    """(model, num_layers) of a parsed LightningCLI config: what decides the base model's shapes."""
    init_args = config[subcommand]["model"].get("init_args") or {}
    return init_args.get("model"), init_args.get("num_layers")


def hand_checkpoint_to_trainer(cli) -> None:
    """Make ``--ckpt_path`` known to the Trainer before ``configure_model`` (LightningCLI's ``before_fit``).

    Under FSDP2 the pruned shapes must exist before the model is sharded and its weights load, and Lightning sets
    ``trainer.ckpt_path`` only after that. Passing the path to ``fit()`` as well would make Lightning forget it,
    so it moves from fit's arguments to the Trainer. Checkpoints are always read weights-only.
    """
    arguments = cli.config_init[cli.subcommand]
    arguments["weights_only"] = True
    if arguments.get("ckpt_path") is not None:
        cli.trainer.ckpt_path = arguments["ckpt_path"]
        arguments["ckpt_path"] = None


def checked_ckpt_parse(cli, parse: Callable[[], None]) -> None:
    """Run LightningCLI's step that replaces the model section by ``--ckpt_path``'s hyper-parameters, turning an
    unreadable file or a silent switch to another base model into one ``ConfigError``."""
    subcommand = cli.config.get("subcommand")
    ckpt_path = cli.config[subcommand].get("ckpt_path") if subcommand else None
    if not ckpt_path:
        parse()
        return
    if ckpt_path == "last":  # Lightning would look in this new run's own (empty) version directory
        ckpt_path = cli.config[subcommand]["ckpt_path"] = last_checkpoint(cli.config[subcommand]["trainer"])
    finish_interrupted_replace(ckpt_path)  # an FSDP2 checkpoint directory whose save was killed mid-rename
    # Before Lightning or torch.distributed.checkpoint reads anything of it: weights-only, directories whole.
    checkpoint = load_checkpoint_metadata(ckpt_path) if Path(ckpt_path).exists() else None
    asked, asked_options = model_identity(cli.config, subcommand), model_options(cli.config, subcommand)
    try:
        parse()
    except UNREADABLE as error:
        raise unreadable_checkpoint(ckpt_path, error) from error
    saved = model_identity(cli.config, subcommand)
    if asked != saved:
        raise ConfigError(
            f"`--ckpt_path={ckpt_path}` was written for --model.model={saved[0]} --model.num_layers={saved[1]} but this "
            f"run asks for --model.model={asked[0]} --model.num_layers={asked[1]}; resume with the same base model, or "
            "start a new run without --ckpt_path")
    saved_options = model_options(cli.config, subcommand)
    if Path(ckpt_path).is_dir():  # LightningCLI takes a file's hyper-parameters only; a directory keeps them in meta.pt
        saved_options = {**saved_options, **checkpoint_model_options(checkpoint or {})}
    problem = changed_options_problem(ckpt_path, asked_options, saved_options)
    if problem:
        raise ConfigError(problem)


def checkpoint_model_options(checkpoint: dict) -> dict:
    """The model options a checkpoint was written with, keyed like ``model_options`` (empty if it has none)."""
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    if "_class_path" in hparams:
        hparams["class_path"] = hparams.pop("_class_path")
    return hparams


def model_options(config, subcommand: str) -> dict:
    """The model section of a parsed LightningCLI config as ``{"class_path": ..., <init arg>: value, ...}``."""
    section = config[subcommand]["model"]
    section = section.as_dict() if hasattr(section, "as_dict") else dict(section)
    return {"class_path": section.get("class_path"), **(section.get("init_args") or {})}


def changed_options_problem(ckpt_path: str, asked: dict, saved: dict) -> str | None:
    """Model options given for this run that the checkpoint's hyper-parameters replaced, or None.

    LightningCLI resumes with the checkpoint's model options (its optimizer and LR schedule come back too), so a
    new ``--model.learning_rate`` would be dropped without a word while the run looks as if it used it.
    """
    changed = [name for name in asked if name in saved and asked[name] != saved[name]]
    if not changed:
        return None
    option = lambda name, value: f"--model={value}" if name == "class_path" else f"--model.{name}={value}"  # noqa: E731
    given = " ".join(option(name, asked[name]) for name in changed)
    written = " ".join(option(name, saved[name]) for name in changed)
    return (f"`--ckpt_path={ckpt_path}` was written with {written} but this run gives {given}; a resumed run keeps the "
            "checkpoint's model options (its optimizer and schedule resume with it): resume with the values of its run's "
            "config.yaml, or start a new run without --ckpt_path")


_LAST_NAME = re.compile(r"^last(-v\d+)?\.ckpt$")  # ModelCheckpoint's last.ckpt, last-v1.ckpt, ...


def last_checkpoint(trainer_config) -> str:
    """What ``--ckpt_path=last`` means to a user: the newest ``last*.ckpt`` (file or FSDP2 directory) where this
    configuration's ModelCheckpoint writes, looking in every earlier ``version_*`` of the logger when the checkpoint
    directory follows the logger (a new run gets a new version, so Lightning's own lookup would find nothing)."""
    directories = checkpoint_directories(trainer_config)
    found = [entry for directory in directories if directory.is_dir() for entry in directory.iterdir()
             if _LAST_NAME.match(entry.name)]
    if not found:
        searched = ", ".join(str(directory) for directory in directories)
        raise ConfigError(f"`--ckpt_path=last` found no last.ckpt in {searched}; give the checkpoint's path "
                          "(--ckpt_path=<run>/checkpoints/last.ckpt), keep `save_last: true` (or `link`) in the ModelCheckpoint, "
                          "or start without --ckpt_path")
    newest = max(found, key=lambda entry: entry.lstat().st_mtime)  # a `save_last: link` link: when it was made
    if not newest.exists():
        raise ConfigError(f"`--ckpt_path=last`: the newest last checkpoint, {newest}, links to {os.readlink(newest)}, "
                          "which was deleted; give a step checkpoint's path instead (--ckpt_path=<dir>/epoch=…-step=….ckpt)")
    return str(newest)


def checkpoint_directories(trainer_config) -> list[Path]:
    """Where ModelCheckpoint writes for this trainer config: its ``dirpath``, else ``<save_dir>/<name>/version_*/
    checkpoints`` of the first logger, else ``<default_root_dir>/checkpoints`` (Lightning's own rule)."""
    as_dict = lambda value: value.as_dict() if hasattr(value, "as_dict") else value  # noqa: E731
    config = as_dict(trainer_config)
    root = Path(config.get("default_root_dir") or ".")
    callbacks = [as_dict(callback) for callback in config.get("callbacks") or []]
    dirpaths = [Path(callback["init_args"]["dirpath"]) for callback in callbacks
                if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("ModelCheckpoint")
                and (callback.get("init_args") or {}).get("dirpath")]
    if dirpaths:
        return dirpaths
    logger = config.get("logger")  # None or True: Lightning's default logger, under lightning_logs/
    if isinstance(logger, list):
        logger = logger[0] if logger else False
    if logger is False:
        return [root / "checkpoints"]
    init_args = (logger.get("init_args") or {}) if isinstance(logger, dict) else {}
    base = Path(init_args.get("save_dir") or root) / (init_args.get("name") or "lightning_logs")
    version = init_args.get("version")
    if version is not None:
        return [base / (version if isinstance(version, str) else f"version_{version}") / "checkpoints"]
    return sorted(base.glob("version_*/checkpoints")) or [base / "version_*" / "checkpoints"]
