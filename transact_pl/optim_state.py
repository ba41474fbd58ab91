"""Carrying optimizer state over a shrink: kept rows/columns keep their moments."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from transact_pl.surgery import ParamSlice


def carry_over_state(old: Optimizer, new: Optimizer, slices: list[ParamSlice]) -> None:
    """Copy per-parameter state (e.g. Adam's step, exp_avg, exp_avg_sq) from ``old`` into ``new``.

    Parameters untouched by surgery are the same objects in both optimizers; for replaced ones the
    state tensors shaped like the old parameter are sliced with the same keep-indices. Learning
    rates and other hyper-parameters of each param group are carried over too.
    """
    replaced = {id(s.old): s for s in slices}
    new_params = {id(p) for group in new.param_groups for p in group["params"]}
    for parameter, state in old.state.items():
        piece = replaced.get(id(parameter))
        target = piece.new if piece is not None else parameter
        if id(target) not in new_params:
            continue
        new.state[target] = {key: _slice_like(value, parameter, piece) for key, value in state.items()}
    for old_group, new_group in zip(old.param_groups, new.param_groups):
        for key, value in old_group.items():
            if key != "params":
                new_group[key] = value


def _slice_like(value, parameter: torch.Tensor, piece: ParamSlice | None):
    if piece is None or not isinstance(value, torch.Tensor) or value.shape != parameter.shape:
        return value.clone() if isinstance(value, torch.Tensor) else value
    return value.index_select(piece.dim, piece.kept.to(value.device)).clone()
