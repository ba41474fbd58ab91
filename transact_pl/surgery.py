"""Physically slicing attention heads and MLP channels out of a model, following a plan.

Surgery replaces the ``weight``/``bias`` Parameters of the affected linears with new, smaller
ones (module objects stay the same). Anything holding the old Parameters — optimizers,
schedulers, FSDP wrappers — must be rebuilt; ``ParamSlice`` records old → new so that
optimizer state of the kept rows/columns can be carried over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from transact_pl.arch import all_layer_parts, model_widths
from transact_pl.head_dim import finish_head_dim_shrink, query_scale, within_head_channels
from transact_pl.plan import PruningPlan


@dataclass
class ParamSlice:
    """``new`` is ``old.index_select(dim, kept) · scale``.

    ``scale`` ≠ 1 only for q_proj under a head-dim shot (√(d'/d), see ``head_dim.query_scale``): the gradient of
    the new parameter is then the old one's / scale, which optimizer state must follow (``optim_state``).
    """

    old: nn.Parameter
    new: nn.Parameter
    dim: int
    kept: Tensor
    scale: float = 1.0


def check_indices(kept: list[int], size: int, what: str) -> Tensor:
    """Validate ascending, unique, in-range keep-indices and return them as a LongTensor."""
    if not kept:
        raise ValueError(f"{what}: nothing kept; a plan must keep at least one index in 0..{size - 1}")
    if any(b <= a for a, b in zip(kept, kept[1:])):
        raise ValueError(f"{what}: kept indices must be strictly ascending, got {kept[:8]}...")
    if kept[0] < 0 or kept[-1] >= size:
        raise ValueError(f"{what}: kept indices must lie in 0..{size - 1}, got {kept[0]}..{kept[-1]}")
    return torch.tensor(kept, dtype=torch.long)


def _replace(module: nn.Module, name: str, dim: int, kept: Tensor) -> ParamSlice:
    old = getattr(module, name)
    new = nn.Parameter(old.detach().index_select(dim, kept.to(old.device)).clone(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    return ParamSlice(old, new, dim, kept)


def keep_out_features(linear: nn.Linear, kept: Tensor) -> list[ParamSlice]:
    """Keep the rows (outputs) ``kept`` of ``linear`` and of its bias."""
    slices = [_replace(linear, "weight", 0, kept)]
    if linear.bias is not None:
        slices.append(_replace(linear, "bias", 0, kept))
    linear.out_features = len(kept)
    return slices


def keep_in_features(linear: nn.Linear, kept: Tensor) -> list[ParamSlice]:
    """Keep the columns (inputs) ``kept`` of ``linear``; its bias is untouched."""
    slices = [_replace(linear, "weight", 1, kept)]
    linear.in_features = len(kept)
    return slices


def head_channels(kept_heads: Tensor, head_dim: int) -> Tensor:
    """(heads,) → (heads · head_dim,): the channel indices of whole heads."""
    return (kept_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def apply_plan(model: nn.Module, plan: PruningPlan) -> dict[str, ParamSlice]:
    """Slice every layer as ``plan`` says and update ``model.config``; returns the replaced parameters by name."""
    current = model_widths(model)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    if current != plan.before:
        raise ValueError(f"plan for shot {plan.shot} expects widths {plan.before}, but the model has {current}")
    slices: list[ParamSlice] = []
    query_slices: list[ParamSlice] = []
    for index, (parts, layer) in enumerate(zip(all_layer_parts(model), plan.layers)):
        heads = check_indices(layer.kept_heads, current.num_heads, f"layer {index} kept_heads")
        kv_heads = check_indices(layer.kept_kv_heads, current.num_kv_heads, f"layer {index} kept_kv_heads")
        mlp = check_indices(layer.kept_mlp_channels, current.intermediate_size, f"layer {index} kept_mlp_channels")
        if len(heads) != plan.after.num_heads or len(kv_heads) != plan.after.num_kv_heads or len(mlp) != plan.after.intermediate_size:
            raise ValueError(f"layer {index} of the plan for shot {plan.shot} does not match its widths {plan.after}")
        channels = within_head_channels(layer, heads, kv_heads, current, plan.after, index)
        if channels is None:  # whole heads
            query, key_value = head_channels(heads, current.head_dim), head_channels(kv_heads, current.head_dim)
            channels = (query, key_value, key_value, query)
        query_slices += keep_out_features(parts.q_proj, channels[0])
        slices += keep_out_features(parts.k_proj, channels[1])
        slices += keep_out_features(parts.v_proj, channels[2])
        slices += keep_in_features(parts.o_proj, channels[3])
        slices += keep_out_features(parts.gate_proj, mlp)
        slices += keep_out_features(parts.up_proj, mlp)
        slices += keep_in_features(parts.down_proj, mlp)
        if hasattr(parts.mlp, "intermediate_size"):
            parts.mlp.intermediate_size = len(mlp)
    _set_config_widths(model.config, plan)
    if plan.after.head_dim != current.head_dim:
        finish_head_dim_shrink(model, current, plan.after, plan.rope_parameters)
        for piece in query_slices:  # finish_head_dim_shrink multiplied q (weight and bias) by this
            piece.scale = query_scale(current.head_dim, plan.after.head_dim)
    return {names[id(piece.old)]: piece for piece in query_slices + slices}


def _set_config_widths(config, plan: PruningPlan) -> None:
    config.num_attention_heads = plan.after.num_heads
    config.num_key_value_heads = plan.after.num_kv_heads
    config.head_dim = plan.after.head_dim
    config.intermediate_size = plan.after.intermediate_size
