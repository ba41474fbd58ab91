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
from transact_pl.head_dim import next_head_dim


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
