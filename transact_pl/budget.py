"""Budget targets: the widths (KV groups, MLP width[, head_dim]) that meet a parameter or KV-cache budget with the best
calibration loss.

A budget is a limit on the pruned model's total parameters, non-embedding parameters or KV-cache bytes per token
(16-bit). Candidates are every number of KV groups g (× each allowed head_dim d); for each, the MLP takes the largest
width that keeps every parameter budget (parameters grow linearly with it), or the MLP target when only the KV cache
is budgeted. Costs are counted on the model class itself, built on the meta device at each candidate's widths.

The candidates that meet every budget are scored by one-shot ``acts`` selection: the activation statistics are
collected once on the dense model, each candidate's plan is made from them, and the calibration loss (mean token
NLL) is measured with the plan applied as masks (zeroed o_proj/down_proj inputs and, for a smaller head_dim, q
channels; the same outputs as the sliced model, without a copy). The lowest loss wins. When no candidate meets the
budget, the ones closest to it (smallest largest cost/limit ratio) are scored instead and the reachable value is
stated.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from decimal import ROUND_FLOOR, Decimal, InvalidOperation

import torch
from rich.table import Table
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from transact_pl.arch import Widths, all_layer_parts, model_widths
from transact_pl.evaluation import kv_cache_bytes_per_token, parameter_counts, perplexity
from transact_pl.head_dim import add_head_dim, collect_head_dim_stats, within_head_channels
from transact_pl.importance import collect_activation_stats
from transact_pl.plan import PruningPlan, make_plan
from transact_pl.scoring import acts_scores
from transact_pl.surgery import head_channels

# kind → (the --pruning option, what it limits)
BUDGET_KINDS = {
    "params": ("--pruning.budget_params", "total parameters"),
    "non_embedding_params": ("--pruning.budget_non_embedding_params", "non-embedding parameters"),
    "kv_bytes": ("--pruning.budget_kv_bytes", "KV-cache bytes per token (16-bit)"),
}
UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}
_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([KMGB]?)\s*$", re.IGNORECASE)
Batches = Iterable[dict[str, Tensor]]


@dataclass(frozen=True)
class Costs:
    """What a model at some widths costs: parameters (tied embeddings once) and KV-cache bytes per token (16-bit)."""

    params: int
    non_embedding_params: int
    kv_bytes: int

    def of(self, kind: str) -> int:
        return getattr(self, kind)


@dataclass(frozen=True)
class Budget:
    kind: str  # a key of BUDGET_KINDS
    limit: int

    @property
    def option(self) -> str:
        return BUDGET_KINDS[self.kind][0]


@dataclass
class Candidate:
    widths: Widths
    costs: Costs
    meets: bool
    calibration_loss: float | None = None  # None: not scored


# ----- reading the options ---------------------------------------------------------------------------------------------
def budget_problem(value: int | float | str, option: str) -> str | None:
    """Why ``value`` is no budget (a count such as 60000000 or "60M", or a fraction in (0, 1] of the dense model)."""
    try:
        amount = _amount(value)
    except ValueError:
        amount = None
    if amount is None or amount <= 0 or (not isinstance(amount, int) and amount > 1):
        return (f"`{option}={value}` is not a budget; give a count (e.g. 60000000, 60M, 1.2B: K, M, G/B are 10³, 10⁶, "
                "10⁹) or a fraction in (0, 1] of the dense model (e.g. 0.5)")
    return None


def _amount(value: int | float | str) -> int | Decimal:
    """An int count, or a Decimal fraction (a float, or a string with a decimal point and no unit)."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return Decimal(str(value))
    match = _AMOUNT.match(str(value))
    if match is None:
        raise ValueError(value)
    number, unit = match.groups()
    if not unit and "." in number:
        return Decimal(number)
    try:
        return int((Decimal(number) * UNITS[unit.upper()]).to_integral_value(rounding=ROUND_FLOOR))
    except InvalidOperation as error:
        raise ValueError(value) from error


def budget_limit(value: int | float | str, dense_cost: int) -> int:
    """The limit ``value`` sets (a fraction is of ``dense_cost``, rounded down so that it is met); see budget_problem."""
    amount = _amount(value)
    if isinstance(amount, int):
        return amount
    return int((amount * dense_cost).to_integral_value(rounding=ROUND_FLOOR))


def parse_budgets(values: dict[str, int | float | str | None], dense: Costs) -> list[Budget]:
    """``{kind: option value or None}`` → the budgets set (values already checked by ``budget_problem``)."""
    return [Budget(kind, budget_limit(value, dense.of(kind))) for kind, value in values.items() if value is not None]


# ----- costs and candidates ----------------------------------------------------------------------------------------------
def config_at(config: PretrainedConfig, widths: Widths) -> PretrainedConfig:
    """A copy of ``config`` describing the model pruned to ``widths``."""
    pruned = copy.deepcopy(config)
    pruned.num_attention_heads, pruned.num_key_value_heads = widths.num_heads, widths.num_kv_heads
    pruned.head_dim, pruned.intermediate_size = widths.head_dim, widths.intermediate_size
    return pruned


def meta_costs(config: PretrainedConfig) -> Callable[[Widths], Costs]:
    """Costs at any widths of the model ``config`` describes (its num_hidden_layers), counted on the meta device."""
    cache: dict[Widths, Costs] = {}

    def cost_of(widths: Widths) -> Costs:
        if widths not in cache:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config_at(config, widths))
            cache[widths] = Costs(*parameter_counts(model), kv_cache_bytes_per_token(model))
        return cache[widths]

    return cost_of


def head_dim_choices(dense_head_dim: int, head_dim_target: int | None, allowed: list[int] | None) -> list[int]:
    """head_dims a budget may choose: the dense one only without ``head_dim_target``; else the target, the dense
    head_dim and (given ``allowed``, the serving sizes) every allowed size between them."""
    if head_dim_target is None:
        return [dense_head_dim]
    between = [size for size in allowed or [] if head_dim_target <= size <= dense_head_dim]
    return sorted({head_dim_target, dense_head_dim, *between})


def _widest_mlp(cost_of: Callable[[Widths], Costs], widths: Widths, budgets: list[Budget]) -> int | None:
    """The largest MLP width (≥ 1) at which ``widths`` keeps every parameter budget (the smallest, 1, when none
    does); None without a parameter budget. Parameters are affine in the MLP width."""
    parameter_budgets = [budget for budget in budgets if budget.kind != "kv_bytes"]
    if not parameter_budgets:
        return None
    full = cost_of(widths)
    if widths.intermediate_size == 1:
        return 1
    narrow = cost_of(replace(widths, intermediate_size=1))
    width = widths.intermediate_size
    for budget in parameter_budgets:
        per_channel = (full.of(budget.kind) - narrow.of(budget.kind)) // (widths.intermediate_size - 1)
        excess = full.of(budget.kind) - budget.limit
        if excess > 0:
            width = min(width, widths.intermediate_size - math.ceil(excess / per_channel))
    return max(1, width)


def make_candidates(dense: Widths, budgets: list[Budget], head_dims: list[int], target_mlp: int,
                    cost_of: Callable[[Widths], Costs]) -> list[Candidate]:
    """One candidate per (KV groups, head_dim), ascending; the MLP fills what the parameter budgets leave (else
    ``target_mlp``)."""
    candidates = []
    for groups in range(1, dense.num_kv_heads + 1):
        for head_dim in head_dims:
            widths = Widths(groups * dense.group_size, groups, head_dim, dense.intermediate_size)
            mlp = _widest_mlp(cost_of, widths, budgets)
            widths = replace(widths, intermediate_size=target_mlp if mlp is None else mlp)
            costs = cost_of(widths)
            candidates.append(Candidate(widths, costs, all(costs.of(b.kind) <= b.limit for b in budgets)))
    return candidates


def candidates_to_score(candidates: list[Candidate], budgets: list[Budget]) -> list[int]:
    """Indices of the candidates that meet every budget; without any, those closest to it (largest cost/limit)."""
    meeting = [index for index, candidate in enumerate(candidates) if candidate.meets]
    if meeting:
        return meeting
    excess = [max(c.costs.of(b.kind) / b.limit for b in budgets) for c in candidates]
    return [index for index, value in enumerate(excess) if value == min(excess)]


def choose(candidates: list[Candidate], scored: list[int]) -> int:
    """The scored candidate with the lowest calibration loss (ties: the fewer parameters, then the first)."""
    return min(scored, key=lambda index: (candidates[index].calibration_loss, candidates[index].costs.params, index))


def statement(candidates: list[Candidate], chosen: int, budgets: list[Budget]) -> str:
    """One line: what was chosen, and each budget against what the choice costs (the closest reachable if unmet)."""
    winner = candidates[chosen]
    parts = []
    for budget in budgets:
        cost = winner.costs.of(budget.kind)
        parts.append(f"{BUDGET_KINDS[budget.kind][1]} {cost:,} {'≤' if cost <= budget.limit else '>'} "
                     f"{budget.limit:,} (`{budget.option}`)")
    head = ("chosen" if winner.meets else "no candidate meets the budget; the closest reachable is")
    return f"{head} {describe(winner.widths)}: {'; '.join(parts)}"


def budget_targets(chosen: Widths, dense: Widths) -> dict[str, int | None]:
    """The --pruning targets the choice resolves to (target_attention counts heads at the dense head_dim)."""
    return {"target_attention": chosen.num_heads * dense.head_dim, "target_mlp": chosen.intermediate_size,
            "head_dim_target": None if chosen.head_dim == dense.head_dim else chosen.head_dim}


def describe(widths: Widths) -> str:
    return f"{widths.num_heads}/{widths.num_kv_heads} heads × {widths.head_dim}, MLP {widths.intermediate_size}"


# ----- scoring by calibration loss ---------------------------------------------------------------------------------------
def one_shot_plan(scores, dense: Widths, widths: Widths, head_stats, rope: dict | None) -> PruningPlan:
    """The ``acts`` plan from the dense model to ``widths`` (with exact-RoPE head-dim selection when it shrinks)."""
    plan = make_plan(scores, dense, widths, shot=1, scorer="acts")
    return plan if widths.head_dim == dense.head_dim else add_head_dim(plan, head_stats, rope)


def _mask(size: int, kept: Tensor) -> Tensor:
    mask = torch.zeros(size)
    mask[kept] = 1.0
    return mask


def _scale_input(mask: Tensor) -> Callable:
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (args[0] * mask.to(args[0]), *args[1:])

    return hook


def _scale_output(mask: Tensor) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output * mask.to(output)

    return hook


@contextmanager
def masked(model: nn.Module, plan: PruningPlan) -> Iterator[nn.Module]:
    """``model`` computing what ``apply_plan(model, plan)`` would, by zeroing what the plan drops: the o_proj inputs of
    dropped heads (and value channels), the down_proj inputs of dropped MLP channels and, when head_dim shrinks, the
    q channels of dropped rotary pairs (their q·k terms vanish; exact RoPE keeps the kept pairs' frequencies)."""
    before, handles = plan.before, []
    try:
        for index, (parts, layer) in enumerate(zip(all_layer_parts(model), plan.layers)):
            heads, kv_heads = torch.tensor(layer.kept_heads), torch.tensor(layer.kept_kv_heads)
            channels = within_head_channels(layer, heads, kv_heads, before, plan.after, index)
            output = head_channels(heads, before.head_dim) if channels is None else channels[3]
            handles.append(parts.o_proj.register_forward_pre_hook(_scale_input(_mask(parts.o_proj.in_features, output))))
            mlp = _mask(parts.down_proj.in_features, torch.tensor(layer.kept_mlp_channels))
            handles.append(parts.down_proj.register_forward_pre_hook(_scale_input(mlp)))
            if channels is not None:
                query = _mask(parts.q_proj.out_features, channels[0])
                handles.append(parts.q_proj.register_forward_hook(_scale_output(query)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def calibration_loss(model: nn.Module, batches: Batches, on_batch: Callable[[], None] | None = None) -> float:
    """Mean next-token NLL (nats) over the calibration batches."""
    return math.log(perplexity(model, batches, on_batch))


@torch.no_grad()
def score(model: nn.Module, candidates: list[Candidate], indices: list[int], batches: Batches,
          on_batch: Callable[[], None] | None = None) -> float:
    """Set the calibration loss of ``candidates[indices]`` (one-shot ``acts`` plans, masked); returns the dense loss.

    ``batches`` is run several times (a DataLoader): statistics once, q/k/o statistics once if a candidate shrinks
    head_dim, the dense loss once, and once per candidate."""
    dense = model_widths(model)
    scores = acts_scores(collect_activation_stats(model, batches, on_batch))
    shrinks_heads = any(candidates[index].widths.head_dim != dense.head_dim for index in indices)
    head_stats = collect_head_dim_stats(model, batches, on_batch) if shrinks_heads else None
    dense_loss = calibration_loss(model, batches, on_batch)
    for index in indices:
        plan = one_shot_plan(scores, dense, candidates[index].widths, head_stats, model.config.rope_parameters)
        with masked(model, plan):
            candidates[index].calibration_loss = calibration_loss(model, batches, on_batch)
    return dense_loss


def passes(candidates: list[Candidate], indices: list[int], dense: Widths) -> int:
    """How many times ``score`` runs the calibration batches."""
    return 2 + len(indices) + any(candidates[index].widths.head_dim != dense.head_dim for index in indices)


# ----- reporting -------------------------------------------------------------------------------------------------------
def candidates_table(candidates: list[Candidate], chosen: int | None, title: str, dense: Candidate | None = None) -> Table:
    """Widths, costs, whether each meets the budget and, once scored (``chosen`` given), the calibration loss (–: not
    scored) and the chosen one (◀)."""
    table = Table(title=title)
    scored = ("calib loss", "chosen") if chosen is not None else ()
    for header in ("", "heads (q/kv)", "head_dim", "MLP", "params", "non-emb params", "KV B/token", "meets", *scored):
        table.add_column(header, justify="right")
    rows = ([("dense", dense)] if dense is not None else []) + [(str(i + 1), c) for i, c in enumerate(candidates)]
    for label, candidate in rows:
        widths, costs = candidate.widths, candidate.costs
        cells = [label, f"{widths.num_heads}/{widths.num_kv_heads}", str(widths.head_dim), f"{widths.intermediate_size:,}",
                 f"{costs.params:,}", f"{costs.non_embedding_params:,}", f"{costs.kv_bytes:,}",
                 "" if candidate is dense else ("yes" if candidate.meets else "no")]
        if chosen is not None:
            cells += ["–" if candidate.calibration_loss is None else f"{candidate.calibration_loss:.4f}",
                      "◀" if candidate is candidates[chosen] else ""]
        table.add_row(*cells)
    return table


def budget_record(budgets: list[Budget], dense: Candidate, candidates: list[Candidate], chosen: int) -> dict:
    """The JSON record of a budget choice (budget.json of the run)."""
    return {"budgets": [{"option": b.option, "limits": BUDGET_KINDS[b.kind][1], "value": b.limit} for b in budgets],
            "scoring": "one-shot acts selection on the dense model, calibration loss = mean next-token NLL (nats) over "
                       "the calibration set, plans applied as masks",
            "dense": asdict(dense), "candidates": [asdict(candidate) for candidate in candidates], "chosen": chosen,
            "meets": candidates[chosen].meets, "statement": statement(candidates, chosen, budgets),
            "targets": budget_targets(candidates[chosen].widths, dense.widths)}
