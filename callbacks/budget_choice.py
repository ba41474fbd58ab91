"""The sizes a run prunes towards besides its explicit targets, resolved by ``TransActPruning`` at the start of the fit.

Serving sizes: ``head_dim_target`` rounded to a head size GPU servers' fast attention kernels take. Budgets: the widths
with the best one-shot calibration loss within a parameter or KV-cache budget (see transact_pl/budget.py), chosen on a
fresh run and kept in checkpoints, so a resume prunes towards the same widths without scoring again.
"""

from __future__ import annotations

import json
import warnings

import lightning as L
from rich.console import Console

from callbacks.progress import progress_task
from callbacks.run_files import run_dir
from transact_pl.arch import Widths
from transact_pl.budget import (BUDGET_KINDS, Candidate, budget_problem, budget_record, candidates_table,
                                candidates_to_score, choose, head_dim_choices, make_candidates, meta_costs,
                                parse_budgets, passes, score, statement)
from transact_pl.errors import ConfigError
from transact_pl.head_dim import SERVING_OPTION, allowed_head_dims, off_kernel_warning, round_head_dim
from transact_pl.schedule import head_dim_schedule

# {"params" | "non_embedding_params" | "kv_bytes": the value of its --pruning.budget_* option, None when not given}
Budgets = dict[str, int | float | str | None]


def has_budget(budgets: Budgets) -> bool:
    return any(value is not None for value in budgets.values())


def budget_problems(budgets: Budgets) -> list[str]:
    """One line for each budget that is neither a count nor a fraction, naming its option."""
    problems = [budget_problem(value, BUDGET_KINDS[kind][0]) for kind, value in budgets.items() if value is not None]
    return [problem for problem in problems if problem]


def serving_head_dim(head_dim_target: int | None, serving_head_dims: int | list[int] | None,
                     dense_head_dim: int) -> tuple[int | None, list[int] | None]:
    """``head_dim_target`` rounded to the nearest serving size, and the serving sizes (None: every even size)."""
    allowed = allowed_head_dims(serving_head_dims, dense_head_dim) if serving_head_dims is not None else None
    if head_dim_target is not None and allowed is not None:
        return round_head_dim(head_dim_target, allowed), allowed
    return head_dim_target, allowed


def warn_at_start(budgets: Budgets, given_targets: list[str], head_dim_target: int | None,
                  serving_head_dims: int | list[int] | None, head_dims: list[int]) -> None:
    """Warning lines at the start: options without effect, or head sizes off the servers' fast kernels.

    ``given_targets``: the ``target_*`` options given a value other than their default; ``head_dims``: the head_dim
    after each shot. Warns as the caller's line.
    """
    if serving_head_dims is not None and head_dim_target is None:
        warnings.warn(f"`{SERVING_OPTION}` has no effect without `--pruning.head_dim_target`", stacklevel=2)
    parameter_budget = budgets["params"] is not None or budgets["non_embedding_params"] is not None
    replaced = ["target_attention", *(["target_mlp"] if parameter_budget else [])]
    given = [name for name in replaced if name in given_targets]
    if has_budget(budgets) and given:
        warnings.warn(f"{' and '.join(f'`--pruning.{name}`' for name in given)} have no effect with a budget: the "
                      "budget's choice replaces them", stacklevel=2)
    warning = off_kernel_warning(head_dims)
    if warning:
        warnings.warn(warning, stacklevel=2)


def pruned_head_dims(dense_head_dim: int, target_head_dim: int | None, num_shots: int,
                     allowed: list[int] | None) -> list[int]:
    """The head sizes the shots prune to (none when head_dim stays dense)."""
    if target_head_dim is None:
        return []
    return [d for d in head_dim_schedule(dense_head_dim, target_head_dim, num_shots, allowed) if d != dense_head_dim]


def budget_widths(trainer: L.Trainer, pl_module: L.LightningModule, dense: Widths, budgets: Budgets,
                  restored: Widths | None, target_mlp: int, head_dim_target: int | None,
                  allowed: list[int] | None) -> Widths:
    """The budgets' choice: ``restored`` from the checkpoint, or chosen by scoring candidates (fresh runs).

    ``target_mlp``: the MLP width when no parameter budget chooses it; ``head_dim_target``: the smallest head_dim a
    candidate may have (None: the dense one); ``allowed``: the serving sizes between it and the dense head_dim.
    """
    if restored is None and pl_module.plans:
        raise ConfigError("the checkpoint holds no budget choice (written by another version, or restored after "
                          "setup by the strategy); resume with the targets of budget.json of its run "
                          "(--pruning.target_attention, target_mlp, head_dim_target) instead of the budget")
    if restored is not None:
        return restored
    head_dims = head_dim_choices(dense.head_dim, head_dim_target, allowed)
    return _choose(trainer, pl_module, dense, budgets, target_mlp, head_dims)


def _choose(trainer: L.Trainer, pl_module: L.LightningModule, dense: Widths, budgets: Budgets, target_mlp: int,
            head_dims: list[int]) -> Widths:
    """Score the candidates on the calibration set, print their table, write budget.json; rank 0's choice."""
    model = pl_module.model
    cost_of = meta_costs(model.config)
    limits = parse_budgets(budgets, cost_of(dense))
    candidates = make_candidates(dense, limits, head_dims, target_mlp, cost_of)
    indices = candidates_to_score(candidates, limits)
    loader = trainer.datamodule.calibration_dataloader()
    total = len(loader) * passes(candidates, indices, dense)
    with progress_task(trainer, f"budget: scoring {len(indices)} candidates", total) as advance:
        dense_loss = score(model, candidates, indices, loader, advance)
    chosen = trainer.strategy.broadcast(choose(candidates, indices), src=0)
    if trainer.is_global_zero:
        dense_row = Candidate(dense, cost_of(dense), True, dense_loss)
        console = Console(width=160)
        console.print(candidates_table(candidates, chosen, "budget candidates (one-shot acts)", dense_row))
        record = budget_record(limits, dense_row, candidates, chosen)
        options = " ".join(f"--pruning.{name}={value}" for name, value in record["targets"].items() if value)
        console.print(f"{statement(candidates, chosen, limits)}; the run prunes towards {options}", highlight=False)
        (run_dir(trainer) / "budget.json").write_text(json.dumps(record, indent=1))
    return candidates[chosen].widths
