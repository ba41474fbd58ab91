"""Carrying optimizer state over a shrink: kept rows/columns keep their moments.

A parameter that surgery also rescales (``ParamSlice.scale`` = c, q_proj under a head-dim shot) has gradient
g/c where the old one had g, so each state tensor is rescaled by the power of the gradient it accumulates:
Adam's exp_avg (Σ g) by 1/c, exp_avg_sq (Σ g²) by 1/c². The moments are then those the optimizer would hold
had the parameter lived in the new parametrisation all along.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from transact_pl.surgery import ParamSlice

# The power of the gradient each per-parameter state tensor of torch's optimizers accumulates.
GRADIENT_POWERS = {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2, "momentum_buffer": 1}


def carry_over_state(old: Optimizer, new: Optimizer, slices: dict[str, ParamSlice]) -> None:
    """Copy per-parameter state (e.g. Adam's step, exp_avg, exp_avg_sq) from ``old`` into ``new``.

    Parameters untouched by surgery are the same objects in both optimizers; for replaced ones the
    state tensors shaped like the old parameter are sliced with the same keep-indices (and rescaled
    with the parameter, see ``carried_state_tensor``). Learning rates and other hyper-parameters of
    each param group are carried over too.
    """
    replaced = {id(s.old): s for s in slices.values()}
    new_params = {id(p) for group in new.param_groups for p in group["params"]}
    for parameter, state in old.state.items():
        piece = replaced.get(id(parameter))
        target = piece.new if piece is not None else parameter
        if id(target) not in new_params:
            continue
        new.state[target] = {key: _slice_like(key, value, parameter, piece) for key, value in state.items()}
    for old_group, new_group in zip(old.param_groups, new.param_groups):
        for key, value in old_group.items():
            if key != "params":
                new_group[key] = value


def carried_state_tensor(key: str, value: Tensor, piece: ParamSlice) -> Tensor:
    """State tensor ``key`` of ``piece.old`` (its shape) → that of ``piece.new``: kept indices, rescaled.

    Raises ValueError for a rescaled parameter whose state ``key`` has no known gradient power (rather than
    carry a moment of the wrong scale).
    """
    kept = value.index_select(piece.dim, piece.kept.to(value.device))
    if piece.scale == 1.0:
        return kept
    if key not in GRADIENT_POWERS:
        raise ValueError(f"optimizer state {key!r} of a parameter rescaled by {piece.scale:.4g} cannot be carried: "
                         f"known per-parameter states are {', '.join(GRADIENT_POWERS)}")
    return kept * piece.scale ** -GRADIENT_POWERS[key]


def _slice_like(key: str, value, parameter: torch.Tensor, piece: ParamSlice | None):
    if piece is None or not isinstance(value, torch.Tensor) or value.shape != parameter.shape:
        return value.clone() if isinstance(value, torch.Tensor) else value
    return carried_state_tensor(key, value, piece).clone()
