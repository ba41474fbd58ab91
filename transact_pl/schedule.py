"""The iterative k-shot width schedule and the resolution of user targets to widths.

At shot i (1-based) of k, with remaining = k − i + 1 (TransAct reference):
    next_attn = cur_attn − (cur_attn − target_attn) // remaining;  heads = ceil(next_attn / head_dim)
    next_mlp  = cur_mlp  − (cur_mlp  − target_mlp)  // remaining
With grouped-query attention the heads are rounded up to whole KV groups.
A fractional target is rounded half up, on the decimal the user wrote (0.5 of 5 KV groups is 3).
"""

from __future__ import annotations

import math
from dataclasses import replace
from decimal import ROUND_HALF_UP, Decimal

from transact_pl.arch import Widths
from transact_pl.head_dim import next_head_dim, rounded_next_head_dim


def round_fraction(fraction: float, count: int) -> int:
    """``fraction · count`` rounded half up, at least 1 (0.5 · 5 → 3, 0.25 · 2 → 1).

    The product is taken on the decimal as written (``str(fraction)``), so a binary float just below a half
    (0.29 · 50 = 14.4999… in floats) still rounds up to 15, as a user reading the YAML expects.
    """
    exact = Decimal(str(fraction)) * count
    return max(1, int(exact.to_integral_value(rounding=ROUND_HALF_UP)))


def resolve_attention_target(value: int | float, dense: Widths, option: str) -> tuple[int | None, str | None]:
    """Target attention width (heads · head_dim) from an absolute width or a fraction of the dense width.

    Returns (width, None) or (None, error message). A fraction is rounded to the nearest whole number of
    KV groups, halves up (``round_fraction``); an absolute width must be a whole number of KV groups.
    """
    group_width = dense.group_size * dense.head_dim
    valid = ", ".join(str(group_width * n) for n in range(1, dense.num_kv_heads + 1))
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            return None, f"`{option}={value}` is a fraction outside (0, 1]; use e.g. 0.5, or an absolute width ({valid})"
        groups = round_fraction(value, dense.num_kv_heads)
        return groups * group_width, None
    if value <= 0 or value > dense.attention_width:
        return None, f"`{option}={value}` is outside 1..{dense.attention_width} (the model's heads · head_dim); valid widths: {valid}"
    if value % group_width:
        return None, (
            f"`{option}={value}` is not a whole number of KV groups ({dense.group_size} heads × {dense.head_dim} "
            f"= {group_width} channels each); valid widths: {valid}"
        )
    return value, None


def resolve_mlp_target(value: int | float, dense: Widths, option: str) -> tuple[int | None, str | None]:
    """Target MLP width from an absolute width or a fraction of the dense intermediate size (halves up)."""
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            return None, f"`{option}={value}` is a fraction outside (0, 1]; use e.g. 0.5, or an absolute width"
        return round_fraction(value, dense.intermediate_size), None
    if value <= 0 or value > dense.intermediate_size:
        return None, f"`{option}={value}` is outside 1..{dense.intermediate_size} (the model's intermediate_size)"
    return value, None


def next_widths(current: Widths, target_attention: int, target_mlp: int, shot: int, num_shots: int) -> Widths:
    """Widths after shot ``shot`` (1-based) of ``num_shots``, moving linearly towards the targets."""
    remaining = num_shots - shot + 1
    attention = current.attention_width - (current.attention_width - target_attention) // remaining
    heads = math.ceil(attention / current.head_dim)
    kv_heads = min(current.num_kv_heads, math.ceil(heads / current.group_size))
    mlp = current.intermediate_size - (current.intermediate_size - target_mlp) // remaining
    return Widths(
        num_heads=kv_heads * current.group_size,
        num_kv_heads=kv_heads,
        head_dim=current.head_dim,
        intermediate_size=mlp,
    )


def width_schedule(dense: Widths, target_attention: int, target_mlp: int, num_shots: int) -> list[Widths]:
    """Widths after every shot, dense first: [dense, after shot 1, ..., after shot k]."""
    widths = [dense]
    for shot in range(1, num_shots + 1):
        widths.append(next_widths(widths[-1], target_attention, target_mlp, shot, num_shots))
    return widths


def shot_widths(current: Widths, dense_head_dim: int, target_attention: int, target_mlp: int,
                head_dim_target: int | None, shot: int, num_shots: int) -> Widths:
    """Widths after shot ``shot`` (1-based) of ``num_shots``, from the widths ``current`` before it.

    Whole KV groups and MLP channels follow ``next_widths`` counted at the dense head_dim (``target_attention``
    counts heads of ``dense_head_dim`` channels); with ``head_dim_target`` every head also shrinks linearly
    towards it (``next_head_dim``), otherwise head_dim stays.
    """
    after = next_widths(replace(current, head_dim=dense_head_dim), target_attention, target_mlp, shot, num_shots)
    if head_dim_target is None:
        return after
    return replace(after, head_dim=next_head_dim(current.head_dim, head_dim_target, shot, num_shots))



def serving_shot_widths(current: Widths, dense_head_dim: int, target_attention: int, target_mlp: int,
                        head_dim_target: int | None, shot: int, num_shots: int, allowed: list[int] | None) -> Widths:
    """``shot_widths`` with every shot's head_dim on a serving-friendly size: the nearest of ``allowed`` between the
    target (itself one of them) and the current head_dim (``head_dim.rounded_next_head_dim``); None: as shot_widths."""
    after = shot_widths(current, dense_head_dim, target_attention, target_mlp, head_dim_target, shot, num_shots)
    if head_dim_target is None or allowed is None:
        return after
    return replace(after, head_dim=rounded_next_head_dim(current.head_dim, head_dim_target, shot, num_shots, allowed))


def head_dim_schedule(dense_head_dim: int, head_dim_target: int | None, num_shots: int,
                      allowed: list[int] | None) -> list[int]:
    """head_dim after every shot (head_dim does not depend on the KV-group and MLP targets)."""
    dense = Widths(1, 1, dense_head_dim, 1)
    widths, dims = dense, []
    for shot in range(1, num_shots + 1):
        widths = serving_shot_widths(widths, dense_head_dim, dense_head_dim, 1, head_dim_target, shot, num_shots, allowed)
        dims.append(widths.head_dim)
    return dims


# ----- when the shots run, and the recovery learning rate between them ------------------------------------------------
LR_SCHEDULES = ("cosine", "per_shot")


def shot_steps(num_shots: int, first_shot_step: int, steps_between_shots: int,
               explicit: list[int] | None = None) -> list[int]:
    """The global step before which each shot runs: ``explicit`` when given (e.g. growing budgets ``[0, 8, 20]``),
    else ``first_shot_step + i · steps_between_shots``."""
    if explicit is not None:
        return list(explicit)
    return [first_shot_step + shot * steps_between_shots for shot in range(num_shots)]


def shot_steps_problems(steps: list[int], num_shots: int, max_steps: int, option: str) -> list[str]:
    """What is wrong with an explicit list of shot steps (empty when it is usable)."""
    if len(steps) != num_shots:
        return [f"`{option}` lists {len(steps)} steps but `--pruning.num_shots={num_shots}`; give one step per shot"]
    if any(step < 0 for step in steps) or steps != sorted(steps):
        return [f"`{option}={steps}` must be non-negative and non-decreasing"]
    if max_steps >= 0 and steps and steps[-1] > max_steps:
        return [f"`{option}` ends at step {steps[-1]} but `--trainer.max_steps={max_steps}`; raise max_steps"]
    return []


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup_steps`` to 1, then a cosine from 1 to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def per_shot_lr(step: int, segment_starts: list[int], max_steps: int, warmup_steps: int, min_ratio: float,
                peak_growth: float) -> float:
    """The reference's recovery schedule: after every shot a fresh warm-up + cosine that ends where the next shot
    starts (the last at ``max_steps``), the peak multiplied by ``peak_growth`` from one shot's recovery to the next.

    ``segment_starts``: the steps where recoveries start (the shot steps; step 0 starts the first in any case).
    A factor of ``learning_rate``; warm-up is capped at half a segment so short segments still decay.
    """
    starts = sorted({0, *[s for s in segment_starts if s < max_steps]})
    index = max(i for i, start in enumerate(starts) if start <= step)
    start = starts[index]
    end = starts[index + 1] if index + 1 < len(starts) else max_steps
    length = max(1, end - start)
    warmup = min(warmup_steps, length // 2)
    return peak_growth ** index * warmup_cosine(step - start, warmup, length, min_ratio)
