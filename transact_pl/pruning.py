"""One pruning shot as pure steps: collect statistics → score → plan (the caller applies the plan).

Every scorer is registered here, once: ``SCORERS`` maps its name (``--pruning.scorer``) to what it needs and
to the function that scores. Adding a scorer is one entry (and its function) in this file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from transact_pl.arch import Widths, model_widths
from transact_pl.importance import ReduceFn, collect_activation_stats, collect_gradient_stats
from transact_pl.plan import PruningPlan, make_plan
from transact_pl.scoring import ChannelScores, acts_scores, magnitude_scores, random_scores, taylor_scores

Batches = Iterable[dict[str, Tensor]]
OnBatch = Callable[[], None] | None


@dataclass(frozen=True)
class Scorer:
    """A scorer: ``score(model, batches, seed, on_batch, reduce_fn)`` → channel scores summed over processes.

    needs_data: runs the calibration batches (else ``batches`` is empty); needs_gradients: runs backward passes.
    """

    score: Callable[[nn.Module, Batches, int, OnBatch, ReduceFn | None], ChannelScores]
    needs_data: bool
    needs_gradients: bool
    description: str


def _summed(stats, reduce_fn: ReduceFn | None):
    if reduce_fn is not None:
        stats.all_reduce(reduce_fn)
    return stats


def _acts(model: nn.Module, batches: Batches, seed: int, on_batch: OnBatch, reduce_fn: ReduceFn | None) -> ChannelScores:
    return acts_scores(_summed(collect_activation_stats(model, batches, on_batch), reduce_fn))


def _taylor(absolute: bool) -> Callable[..., ChannelScores]:
    def score(model: nn.Module, batches: Batches, seed: int, on_batch: OnBatch, reduce_fn: ReduceFn | None) -> ChannelScores:
        return taylor_scores(model, _summed(collect_gradient_stats(model, batches, on_batch, absolute=absolute), reduce_fn))

    return score


SCORERS: dict[str, Scorer] = {
    "acts": Scorer(_acts, True, False, "TransAct: sqrt(Σ a²) of the transitional activations (input of o_proj, down_proj)"),
    "taylor": Scorer(_taylor(absolute=False), True, True, "first-order Taylor |Σ_batches ∂L/∂W ⊙ W|"),
    "taylor_abs": Scorer(_taylor(absolute=True), True, True, "the reference's Taylor accumulation Σ_batches |∂L/∂W ⊙ W|"),
    "magnitude": Scorer(lambda model, *_: magnitude_scores(model), False, False, "blind baseline Σ|W|"),
    "random": Scorer(lambda model, batches, seed, *_: random_scores(model, seed), False, False, "blind baseline, seeded"),
}


def compute_scores(
    model: nn.Module,
    scorer: str,
    batches: Batches,
    seed: int,
    on_batch: OnBatch = None,
    reduce_fn: ReduceFn | None = None,
) -> ChannelScores:
    """Channel scores of ``model`` by ``scorer``; statistics are summed over processes by ``reduce_fn``."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    return SCORERS[scorer].score(model, batches, seed, on_batch, reduce_fn)


def plan_shot(model: nn.Module, scores: ChannelScores, after: Widths, shot: int, scorer: str) -> PruningPlan:
    """The plan that takes ``model`` from its current widths to ``after``."""
    return make_plan(scores, model_widths(model), after, shot, scorer)


def scorer_needs_data(scorer: str) -> bool:
    return SCORERS[scorer].needs_data
