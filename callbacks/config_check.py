"""Checking a whole ``fit`` configuration at startup and reporting every problem in one error.

LightningCLI calls :func:`check_fit_config` in ``before_fit``, before any weights are loaded: the
base model's config and tokenizer, the data (files, splits, calibration set) and every callback
that offers ``config_problems(trainer, dense_widths, model_config)`` (pruning targets and schedule, the export
directory). The checks are the components' own; this module only gathers their messages.
:func:`checked_ckpt_parse` guards the CLI's ``--ckpt_path`` step: an unreadable file or a checkpoint of
another base model becomes one ``ConfigError`` instead of a traceback or a silent model switch.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L

from transformers import PretrainedConfig

from callbacks.atomic_checkpoint import UNREADABLE, finish_interrupted_replace, unreadable_checkpoint
from datamodules.text import load_documents
from transact_pl.arch import Widths, config_widths, model_type_problem
from transact_pl.errors import ConfigError
from transact_pl.validation import load_model_config, model_problems, tokenizer_problem


def _model_problems(module: L.LightningModule) -> tuple[list[str], PretrainedConfig | None]:
    """(problems, the base model's config or None when it cannot be read)."""
    hparams = module.hparams
    try:
        config = load_model_config(hparams.model)
    except ConfigError as error:
        return [str(error)], None
    return model_problems(config, hparams.model, hparams.num_layers, hparams.dtype), config


def _data_problems(datamodule: L.LightningDataModule, model_config: PretrainedConfig, source: str) -> list[str]:
    """Missing or empty data, empty splits, a calibration set larger than the data, a foreign tokenizer."""
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
    except ConfigError as error:
        return _document_problems(datamodule) or [str(error)]
    problems: list[str] = []
    checks = [lambda: datamodule.split_blocks("train"), lambda: datamodule.split_blocks("val"),
              lambda: datamodule.split_blocks("test"), datamodule.calibration_blocks]
    for check in checks:
        try:
            check()
        except ConfigError as error:
            problems.append(str(error))
    problem = tokenizer_problem(datamodule.tokenizer, model_config, source)
    return problems + ([problem] if problem else [])


def _document_problems(datamodule: L.LightningDataModule) -> list[str]:
    """Missing, empty or malformed ``--data.dataset`` / ``--data.calibration_file``."""
    problems = []
    for source, option in ((datamodule.dataset, "--data.dataset"), (datamodule.calibration_file, "--data.calibration_file")):
        try:
            if source is not None:
                load_documents(source, option)
        except ConfigError as error:
            problems.append(str(error))
    return problems


def fit_config_problems(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule) -> list[str]:
    """Every problem of the configuration, in section order (model, data, callbacks), without duplicates."""
    problems, model_config = _model_problems(module)
    if model_config is not None:
        problems += _data_problems(datamodule, model_config, module.hparams.model)
    else:  # the tokenizer is the model's: without it only the data files themselves can be checked
        problems += _document_problems(datamodule)
    dense: Widths | None = None
    if model_config is not None and model_type_problem(model_config.model_type) is None:
        dense = config_widths(model_config)
    for callback in trainer.callbacks:
        check = getattr(callback, "config_problems", None)
        if callable(check):
            problems += check(trainer, dense, model_config)
    return list(dict.fromkeys(problems))


def check_fit_config(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule) -> None:
    """Raise one ``ConfigError`` listing every problem (``; ``-separated), or return."""
    problems = fit_config_problems(trainer, module, datamodule)
    if problems:
        raise ConfigError("; ".join(problems))


# Strategies that cannot shrink a model mid-run: FSDP1 flattens parameters, DeepSpeed owns the optimizer.
UNSUPPORTED_STRATEGIES = ("fsdp", "deepspeed")


def strategy_problem(strategy: object) -> str | None:
    """Why ``--trainer.strategy`` (a registry name, or a class_path/instance config) cannot run TransAct, or None."""
    name = getattr(strategy, "class_path", None) or (strategy.get("class_path") if isinstance(strategy, dict) else None)
    name = str(name if name is not None else strategy)
    short = name.rsplit(".", 1)[-1].lower()
    if not any(short.startswith(prefix) for prefix in UNSUPPORTED_STRATEGIES):
        return None
    return (f"`--trainer.strategy={name}` is not supported (shrinking a model mid-run needs FSDP2 or DDP); for sharding use "
            "--config configs/smollm2_transact_fsdp.yaml (strategy callbacks.atomic_checkpoint.AtomicModelParallelStrategy), "
            "else --trainer.strategy=ddp")


def model_identity(config, subcommand: str) -> tuple:
    """(model, num_layers) of a parsed LightningCLI config: what decides the base model's shapes."""
    init_args = config[subcommand]["model"].get("init_args") or {}
    return init_args.get("model"), init_args.get("num_layers")


def checked_ckpt_parse(cli, parse: Callable[[], None]) -> None:
    """Run LightningCLI's step that replaces the model section by ``--ckpt_path``'s hyper-parameters, turning an
    unreadable file or a silent switch to another base model into one ``ConfigError``."""
    subcommand = cli.config.get("subcommand")
    ckpt_path = cli.config[subcommand].get("ckpt_path") if subcommand else None
    if not ckpt_path:
        parse()
        return
    finish_interrupted_replace(ckpt_path)  # an FSDP2 checkpoint directory whose save was killed mid-rename
    asked = model_identity(cli.config, subcommand)
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
