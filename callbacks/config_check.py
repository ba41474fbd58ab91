"""Checking a whole ``fit`` configuration at startup and reporting every problem in one error.

LightningCLI calls :func:`check_fit_config` in ``before_fit``, before any weights are loaded: the
base model's config and tokenizer, the data (files, splits, calibration set) and every ``StartupChecks`` callback
(``config_problems(trainer, dense_widths, model_config)``: pruning targets and schedule, report texts, the export
directory). The checks are the components' own; this module only gathers their messages.
Checks of a resumed checkpoint live with the rest of the resume path in ``callbacks.resume``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback

from transformers import PretrainedConfig

from callbacks.pruning_report import find_report
from callbacks.startup_checks import StartupChecks
from datamodules.sources import load_documents
from transact_pl.arch import Widths, config_widths, model_type_problem
from transact_pl.errors import ConfigError
from transact_pl.eval_suite import DEFAULT_PROMPTS
from transact_pl.infra.validation import context_problems, load_model_config, model_problems, tokenizer_problem, weights_problems


def _model_problems(module: L.LightningModule) -> tuple[list[str], PretrainedConfig | None]:
    """(problems, the base model's config or None when it cannot be read)."""
    hparams = module.hparams
    option_problems = module.hparam_problems()
    try:
        config = load_model_config(hparams.model)
    except ConfigError as error:
        return [str(error), *option_problems], None
    problems = model_problems(config, hparams.model, hparams.num_layers, hparams.dtype) + weights_problems(hparams.model)
    return problems + option_problems, config


def _data_problems(datamodule: L.LightningDataModule, model_config: PretrainedConfig, source: str) -> list[str]:
    """Missing or empty data, empty splits, a calibration set larger than the data, a foreign tokenizer."""
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
    except ConfigError as error:  # the data files' own problems, and the tokenizer's (setup tokenizes)
        return list(dict.fromkeys([*_document_problems(datamodule), str(error)]))
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


def _context_problems(trainer: L.Trainer, datamodule: L.LightningDataModule, model_config: PretrainedConfig) -> list[str]:
    """Blocks, or sample prompts plus ``--report.sample_new_tokens``, longer than the base model's context."""
    report = find_report(trainer)
    new_tokens = report.sample_new_tokens if report is not None and report.measures_heldout() else 0
    prompt_tokens: list[int] = []
    if new_tokens > 0:
        try:
            prompt_tokens = [len(datamodule.tokenizer(prompt, add_special_tokens=False)["input_ids"]) for prompt in DEFAULT_PROMPTS]
        except ConfigError:  # no tokenizer: reported with the data's problems
            pass
    return context_problems(model_config, datamodule.block_size, new_tokens, prompt_tokens)


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
        problems += _context_problems(trainer, datamodule, model_config)
    else:  # the tokenizer is the model's: without it only the data files themselves can be checked
        problems += _document_problems(datamodule)
    dense: Widths | None = None
    if model_config is not None and model_type_problem(model_config.model_type) is None:
        dense = config_widths(model_config)
    for callback in trainer.callbacks:
        if isinstance(callback, StartupChecks):
            problems += callback.config_problems(trainer, dense, model_config)
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
    if short == "modelparallelstrategy":
        return (f"`--trainer.strategy={name}` would let torch.distributed.checkpoint unpickle checkpoint directories "
                "unchecked; use its equivalent callbacks.atomic_checkpoint.AtomicModelParallelStrategy (the same FSDP2 "
                "strategy, with atomic and safely read checkpoint directories), as configs/variants/fsdp.yaml does")
    if not any(short.startswith(prefix) for prefix in UNSUPPORTED_STRATEGIES):
        return None
    return (f"`--trainer.strategy={name}` is not supported (shrinking a model mid-run needs FSDP2 or DDP); for sharding use "
            "--config configs/variants/fsdp.yaml (strategy callbacks.atomic_checkpoint.AtomicModelParallelStrategy), "
            "else --trainer.strategy=ddp")


class RunConfigCallback(SaveConfigCallback):
    """LightningCLI's config.yaml writer that takes its files back when the run fails before it trained.

    config.yaml is written when the Trainer sets up, before the model loads and the callbacks check a
    resumed checkpoint; a configuration error found there used to leave a run directory holding nothing
    but that file. When the log directory was empty before this run, the files the run wrote there
    (config.yaml, the logger's hparams.yaml) are removed if nothing else joined them, then the log directory
    and its parents up to the logger's root while they are empty.
    """

    RUN_FILES = ("config.yaml", "hparams.yaml")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # a collective: every rank calls it
        self._fresh_log_dir: Path | None = None
        if log_dir and "://" not in str(log_dir):
            path = Path(log_dir)
            if not path.exists() or all(e.name in self.RUN_FILES and e.name != self.config_filename for e in path.iterdir()):
                self._fresh_log_dir = path
        super().setup(trainer, pl_module, stage)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        log_dir = getattr(self, "_fresh_log_dir", None)
        if not isinstance(exception, ConfigError) or log_dir is None or not trainer.is_global_zero:
            return
        if trainer.global_step > 0 or not log_dir.is_dir():
            return
        entries = list(log_dir.iterdir())
        if any(entry.name not in self.RUN_FILES or not entry.is_file() for entry in entries):
            return
        for entry in entries:
            entry.unlink()
        logger_root = trainer.loggers[0].save_dir if trainer.loggers and trainer.loggers[0].save_dir else None
        root = Path(logger_root or log_dir).resolve()
        for directory in [log_dir.resolve(), *log_dir.resolve().parents]:
            if directory == Path.cwd().resolve() or (directory != root and root not in directory.parents):
                break
            try:
                directory.rmdir()  # only while empty
            except OSError:
                break
