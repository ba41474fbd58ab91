"""Dry run of a pruning schedule: the widths of every shot, from a config YAML, on the CPU, without weights.

    python -m transact_pl.infra.plan_preview --config configs/llama_7b_transact_fsdp_8gpu.yaml
    python -m transact_pl.infra.plan_preview --config my.yaml --model-config /path/to/config.json

Reads the YAML's ``model`` and ``pruning`` sections (validated against the same classes train.py uses, so
their defaults and types are the CLI's), gets the base model's Hugging Face config without any weight, and
prints per shot: the training step it runs before, heads (query/KV), head_dim, MLP width, non-embedding
parameters and KV-cache bytes per token. Parameter counts come from the model class itself, built on the meta
device at each shot's widths. The config comes from ``--model-config``, the embedded default, a local
directory, the Hugging Face cache, or (offline, for the shapes in ``EMBEDDED_CONFIGS``) the published shape.

With a budget (``--pruning.budget_*``) it prints the budget's candidates instead: widths, costs and whether each
meets the budget. Choosing among them needs the calibration loss, hence the weights: train.py scores them at startup.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from transact_pl.arch import Widths, config_widths, model_type_problem
from transact_pl.infra.assets import EMBEDDED_MODEL, AssetError, resolve_model_source
from transact_pl.errors import ConfigError
from transact_pl.evaluation import kv_cache_bytes_per_token, parameter_counts
from transact_pl.budget import (BUDGET_KINDS, Candidate, budget_problem, candidates_table, candidates_to_score,
                                head_dim_choices, make_candidates, meta_costs, parse_budgets)
from transact_pl.head_dim import (allowed_head_dims, head_dim_problems, off_kernel_warning, round_head_dim,
                                  serving_sizes_problems)
from transact_pl.infra.loading import truncate_layers
from transact_pl.schedule import (resolve_attention_target, resolve_mlp_target, serving_shot_widths, shot_steps,
                                  shot_steps_problems)

# Published config.json values of hub models a dry run may name without the hub (no weights are needed).
EMBEDDED_CONFIGS = {
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False),
}


@dataclass
class ShotRow:
    """The widths after one shot (shot 0: the dense model) and what they cost."""

    shot: int
    step: int | None  # the global step the shot runs before; None for the dense model
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    non_embedding_params: int
    kv_bytes_per_token: int


@dataclass
class Schedule:
    """The ``pruning`` options that decide widths and steps (``TransActPruning.__init__``'s)."""

    target_attention: int | float
    target_mlp: int | float
    num_shots: int
    first_shot_step: int
    steps_between_shots: int
    head_dim_target: int | None = None
    shot_steps: list[int] | None = None
    serving_head_dims: int | list[int] | None = None
    budget_params: int | float | str | None = None
    budget_non_embedding_params: int | float | str | None = None
    budget_kv_bytes: int | float | str | None = None

    def budgets(self) -> dict[str, int | float | str | None]:
        """{budget kind: option value or None}, as ``transact_pl.budget.parse_budgets`` takes them."""
        return {"params": self.budget_params, "non_embedding_params": self.budget_non_embedding_params,
                "kv_bytes": self.budget_kv_bytes}

    def head_dims(self, dense_head_dim: int) -> tuple[int | None, list[int] | None]:
        """(head_dim_target rounded to a serving size, the serving sizes), as the training run resolves them."""
        if self.serving_head_dims is None:
            return self.head_dim_target, None
        allowed = allowed_head_dims(self.serving_head_dims, dense_head_dim)
        return (None if self.head_dim_target is None else round_head_dim(self.head_dim_target, allowed)), allowed


# ----- the base model's config -----------------------------------------------------------------------------------------
def model_config(source: str, config_json: str | None = None) -> tuple[PretrainedConfig, str]:
    """(the base model's config, where it came from); a ConfigError when none can be had offline."""
    if config_json is not None:
        if not Path(config_json).is_file():
            raise ConfigError(f"`--model-config={config_json}` is not a file; give a model's config.json")
        return AutoConfig.from_pretrained(config_json), config_json
    if source == EMBEDDED_MODEL or Path(source).is_dir():
        try:
            return AutoConfig.from_pretrained(resolve_model_source(source)), source
        except (OSError, ValueError, AssetError) as error:
            raise ConfigError(f"`--model.model={source}` has no readable config ({error}); pass "
                              "--model-config /path/to/config.json") from error
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True), f"{source} (Hugging Face cache)"
    except (OSError, ValueError):
        pass
    if source in EMBEDDED_CONFIGS:
        return LlamaConfig(**EMBEDDED_CONFIGS[source]), f"{source} (published shape, embedded)"
    raise ConfigError(f"`--model.model={source}` is neither a local directory nor in the Hugging Face cache, and its "
                      "shape is not embedded; pass --model-config /path/to/its/config.json")


def at_widths(config: PretrainedConfig, widths: Widths) -> PretrainedConfig:
    """A copy of ``config`` describing the model pruned to ``widths`` (what surgery writes into it)."""
    pruned = copy.deepcopy(config)
    pruned.num_attention_heads, pruned.num_key_value_heads = widths.num_heads, widths.num_kv_heads
    pruned.head_dim, pruned.intermediate_size = widths.head_dim, widths.intermediate_size
    return pruned


def costs(config: PretrainedConfig, num_layers: int | None) -> tuple[int, int]:
    """(non-embedding parameters, KV bytes per token) of the model ``config`` describes, built without memory."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if num_layers is not None:
        truncate_layers(model, num_layers)
    return parameter_counts(model)[1], kv_cache_bytes_per_token(model)


# ----- the schedule ----------------------------------------------------------------------------------------------------
def schedule_problems(schedule: Schedule, dense: Widths, config: PretrainedConfig) -> list[str]:
    """Every problem of the targets and schedule for this model, named as the CLI options are."""
    problems = [model_type_problem(config.model_type)]
    if schedule.num_shots < 1:
        problems.append(f"`--pruning.num_shots={schedule.num_shots}` must be at least 1")
    for resolve, value, option in ((resolve_attention_target, schedule.target_attention, "--pruning.target_attention"),
                                   (resolve_mlp_target, schedule.target_mlp, "--pruning.target_mlp")):
        problems.append(resolve(value, dense, option)[1])
    if schedule.head_dim_target is not None:
        problems += head_dim_problems(schedule.head_dim_target, dense.head_dim, config)
    if schedule.shot_steps is not None:
        problems += shot_steps_problems(schedule.shot_steps, schedule.num_shots, -1, "--pruning.shot_steps")
    if schedule.serving_head_dims is not None:
        problems += serving_sizes_problems(schedule.serving_head_dims, dense.head_dim)
    for kind, value in schedule.budgets().items():
        problems.append(None if value is None else budget_problem(value, BUDGET_KINDS[kind][0]))
    return [problem for problem in problems if problem]


def preview_rows(config: PretrainedConfig, schedule: Schedule, num_layers: int | None = None) -> list[ShotRow]:
    """The dense model and every shot of ``schedule`` on the model ``config`` describes (first ``num_layers``)."""
    dense = config_widths(config)
    problems = schedule_problems(schedule, dense, config)
    if problems:
        raise ConfigError("; ".join(problems))
    target_attention = resolve_attention_target(schedule.target_attention, dense, "")[0]
    target_mlp = resolve_mlp_target(schedule.target_mlp, dense, "")[0]
    head_dim_target, allowed = schedule.head_dims(dense.head_dim)
    widths, rows = dense, []
    steps = shot_steps(schedule.num_shots, schedule.first_shot_step, schedule.steps_between_shots, schedule.shot_steps)
    for shot in range(schedule.num_shots + 1):
        if shot:
            widths = serving_shot_widths(widths, dense.head_dim, target_attention, target_mlp, head_dim_target,
                                         shot, schedule.num_shots, allowed)
        step = steps[shot - 1] if shot else None
        rows.append(ShotRow(shot, step, widths.num_heads, widths.num_kv_heads, widths.head_dim,
                            widths.intermediate_size, *costs(at_widths(config, widths), num_layers)))
    return rows


def truncated(config: PretrainedConfig, num_layers: int | None) -> PretrainedConfig:
    """A copy of ``config`` with its first ``num_layers`` layers (``--model.num_layers``), as train.py loads it."""
    config = copy.deepcopy(config)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[:num_layers]
    return config


def budget_candidates(config: PretrainedConfig, schedule: Schedule, num_layers: int | None = None) -> list[Candidate]:
    """The candidates a budget run scores, with their costs and whether each meets the budget (no weights)."""
    dense = config_widths(config)
    problems = schedule_problems(schedule, dense, config)
    if problems:
        raise ConfigError("; ".join(problems))
    cost_of = meta_costs(truncated(config, num_layers))
    head_dim_target, allowed = schedule.head_dims(dense.head_dim)
    target_mlp = resolve_mlp_target(schedule.target_mlp, dense, "")[0]
    budgets = parse_budgets(schedule.budgets(), cost_of(dense))
    return make_candidates(dense, budgets, head_dim_choices(dense.head_dim, head_dim_target, allowed), target_mlp, cost_of)


def preview_table(rows: list[ShotRow], title: str) -> Table:
    table = Table(title=title)
    for header in ("shot", "before step", "heads (q/kv)", "head_dim", "MLP", "non-emb params", "KV B/token (16-bit)"):
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row("dense" if row.shot == 0 else str(row.shot), "-" if row.step is None else f"{row.step:,}",
                      f"{row.heads}/{row.kv_heads}", str(row.head_dim), f"{row.mlp:,}",
                      f"{row.non_embedding_params / 1e6:,.1f} M", f"{row.kv_bytes_per_token:,}")
    return table


# ----- reading a train.py config -------------------------------------------------------------------------------------
def read_config(path: str) -> tuple[str, int | None, Schedule, int | None]:
    """(base model, num_layers, schedule, trainer.max_steps) from a train.py YAML, with train.py's defaults.

    The ``model`` and ``pruning`` sections are parsed against the classes train.py instantiates (jsonargparse,
    as LightningCLI does), so unknown keys and wrong types are refused the same way.
    """
    from jsonargparse import ArgumentParser  # the CLI's parser and classes only for this entry point

    from callbacks.transact_pruning import TransActPruning
    from transact_pl.lightning_modules.transact_lm import TransActLM

    if not Path(path).is_file():
        raise ConfigError(f"`--config={path}` does not exist; give a YAML written for train.py")
    document = yaml.safe_load(Path(path).read_text()) or {}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TransActPruning, "pruning")
    parser.add_subclass_arguments(TransActLM, "model", required=False)
    try:
        parsed = parser.parse_object({key: document[key] for key in ("model", "pruning") if key in document})
    except argparse.ArgumentError as error:
        raise ConfigError(f"{path}: {' '.join(str(error).split())}") from error
    if parsed.model:
        source, num_layers = parsed.model.init_args.model, parsed.model.init_args.num_layers
    else:  # no model section: TransActLM's own defaults, as train.py takes them
        defaults = inspect.signature(TransActLM.__init__).parameters
        source, num_layers = defaults["model"].default, defaults["num_layers"].default
    options = parsed.pruning
    schedule = Schedule(options.target_attention, options.target_mlp, options.num_shots, options.first_shot_step,
                        options.steps_between_shots, options.head_dim_target, options.shot_steps,
                        options.serving_head_dims, options.budget_params, options.budget_non_embedding_params,
                        options.budget_kv_bytes)
    return source, num_layers, schedule, (document.get("trainer") or {}).get("max_steps")


def preview(config_path: str, config_json: str | None = None,
            console: Console | None = None) -> list[ShotRow] | list[Candidate]:
    """Print the dry-run table of ``config_path`` and return its rows (a budget's candidates when it has one)."""
    source, num_layers, schedule, max_steps = read_config(config_path)
    config, origin = model_config(source, config_json)
    layers = num_layers or config.num_hidden_layers
    console = console or Console(width=140)
    if any(value is not None for value in schedule.budgets().values()):
        return preview_budget(config, schedule, num_layers, f"{config_path}: {origin}, {layers} layers", console)
    rows = preview_rows(config, schedule, num_layers)
    console.print(preview_table(rows, f"{config_path}: {origin}, {layers} layers, {schedule.num_shots} shots"))
    dense_head_dim = config_widths(config).head_dim
    warning = off_kernel_warning(row.head_dim for row in rows[1:] if row.head_dim != dense_head_dim)
    if warning:
        warnings.warn(warning, stacklevel=2)
    if max_steps is not None and 0 <= max_steps < rows[-1].step:
        warnings.warn(f"shot {schedule.num_shots} is due before step {rows[-1].step:,} but trainer.max_steps is "
                      f"{max_steps:,}; train.py will refuse this schedule", stacklevel=2)
    return rows


def preview_budget(config: PretrainedConfig, schedule: Schedule, num_layers: int | None, title: str,
                   console: Console) -> list[Candidate]:
    """Print a budget's candidates, which of them train.py would score, and return them."""
    candidates = budget_candidates(config, schedule, num_layers)
    budgets = parse_budgets(schedule.budgets(), meta_costs(truncated(config, num_layers))(config_widths(config)))
    scored = candidates_to_score(candidates, budgets)
    console.print(candidates_table(candidates, None, f"{title}: budget candidates"))
    limits = "; ".join(f"`{budget.option}` = {budget.limit:,} {BUDGET_KINDS[budget.kind][1]}" for budget in budgets)
    which = "that meet it" if candidates[scored[0]].meets else "closest to it (none meets it)"
    console.print(f"{limits}. train.py scores the {len(scored)} candidates {which} ({', '.join(str(i + 1) for i in scored)}) "
                  "by one-shot acts selection and calibration loss, which needs the weights, and trains towards the "
                  "best; the dry run only lists them.", highlight=False)
    dense_head_dim = config_widths(config).head_dim
    warning = off_kernel_warning(candidates[i].widths.head_dim for i in scored
                                 if candidates[i].widths.head_dim != dense_head_dim)
    if warning:
        warnings.warn(warning, stacklevel=2)
    return candidates


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m transact_pl.infra.plan_preview", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a train.py config YAML (its model and pruning sections)")
    parser.add_argument("--model-config", default=None,
                        help="the base model's config.json, when --model.model cannot be read offline")
    parsed = parser.parse_args(args)
    try:
        preview(parsed.config, parsed.model_config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
