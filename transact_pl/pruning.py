"""One pruning shot as pure steps: collect statistics → score → plan (the caller applies the plan)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor, nn

from transact_pl.arch import Widths, model_widths
from transact_pl.importance import ReduceFn, collect_activation_stats, collect_gradient_stats
from transact_pl.plan import PruningPlan, make_plan
from transact_pl.scoring import ChannelScores, acts_scores, magnitude_scores, random_scores, taylor_scores


def compute_scores(
    model: nn.Module,
    scorer: str,
    batches: Iterable[dict[str, Tensor]],
    seed: int,
    on_batch: Callable[[], None] | None = None,
    reduce_fn: ReduceFn | None = None,
) -> ChannelScores:
    """Channel scores of ``model`` by ``scorer``; statistics are summed over processes by ``reduce_fn``."""
    if scorer == "acts":
        stats = collect_activation_stats(model, batches, on_batch)
        if reduce_fn is not None:
            stats.all_reduce(reduce_fn)
        return acts_scores(stats)
    if scorer in ("taylor", "taylor_abs"):
        grads = collect_gradient_stats(model, batches, on_batch, absolute=scorer == "taylor_abs")
        if reduce_fn is not None:
            grads.all_reduce(reduce_fn)
        return taylor_scores(model, grads)
    if scorer == "magnitude":
        return magnitude_scores(model)
    if scorer == "random":
        return random_scores(model, seed)
    raise ValueError(f"unknown scorer {scorer!r}")


def plan_shot(model: nn.Module, scores: ChannelScores, after: Widths, shot: int, scorer: str) -> PruningPlan:
    """The plan that takes ``model`` from its current widths to ``after``."""
    return make_plan(scores, model_widths(model), after, shot, scorer)


def scorer_needs_data(scorer: str) -> bool:
    return scorer in ("acts", "taylor", "taylor_abs")
