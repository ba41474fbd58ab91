"""Checking a whole ``fit`` configuration at startup and reporting every problem in one error.

LightningCLI calls :func:`check_fit_config` in ``before_fit``, before any weights are loaded: the
base model's config and tokenizer, the data (files, splits, calibration set) and every callback
that offers ``config_problems(trainer, dense_widths, model_config)`` (pruning targets and schedule, the export
directory). The checks are the components' own; this module only gathers their messages.
:func:`checked_ckpt_parse` guards the CLI's ``--ckpt_path`` step: an unreadable file or a checkpoint of
another base model becomes one ``ConfigError`` instead of a traceback or a silent model switch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback

from transformers import PretrainedConfig

from callbacks.atomic_checkpoint import UNREADABLE, finish_interrupted_replace, unreadable_checkpoint
from callbacks.pruning_report import find_report
from callbacks.startup_checks import StartupChecks
from datamodules.text import load_documents
from transact_pl.arch import Widths, config_widths, model_type_problem
from transact_pl.errors import ConfigError
from transact_pl.eval_suite import DEFAULT_PROMPTS
from transact_pl.infra.safe_load import load_checkpoint_metadata
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
                "strategy, with atomic and safely read checkpoint directories), as configs/smollm2_transact_fsdp.yaml does")
    if not any(short.startswith(prefix) for prefix in UNSUPPORTED_STRATEGIES):
        return None
    return (f"`--trainer.strategy={name}` is not supported (shrinking a model mid-run needs FSDP2 or DDP); for sharding use "
            "--config configs/smollm2_transact_fsdp.yaml (strategy callbacks.atomic_checkpoint.AtomicModelParallelStrategy), "
            "else --trainer.strategy=ddp")


WEIGHTS_ONLY_REFUSAL = ("`--weights_only=false` is not supported: checkpoints are always read with weights_only=True, "
                        "so a checkpoint cannot run code; those written by train.py need nothing more: drop the option")


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
                          "(--ckpt_path=<run>/checkpoints/last.ckpt), keep `save_last: true` in the ModelCheckpoint, "
                          "or start without --ckpt_path")
    return str(max(found, key=lambda entry: entry.stat().st_mtime))


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
