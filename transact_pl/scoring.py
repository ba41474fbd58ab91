"""Channel, head and KV-group importance for every scorer (never mutates the model).

Every scorer yields per-layer channel scores on the two transitional widths:
attention (num_heads · head_dim, the query-side channels that feed o_proj) and MLP
(intermediate_size). Heads and KV groups are then scored from channels the same way:

    head score   S_h = mean_{c∈h} s_c + (10 / head_dim) · max_{c∈h} s_c
    group score  S_g = Σ_{h∈g} S_h      (grouped-query attention: a KV head and its query heads)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from transact_pl.arch import PRUNABLE_LINEARS, LayerParts, all_layer_parts, model_widths
from transact_pl.importance import ActivationStats, GradientStats


@dataclass
class ChannelScores:
    """attention[i]: (num_heads · head_dim,); mlp[i]: (intermediate_size,) — fp32, one per layer."""

    attention: list[Tensor]
    mlp: list[Tensor]


def acts_scores(stats: ActivationStats) -> ChannelScores:
    """TransAct: s_c = sqrt(Σ over calibration tokens of a_c²), no normalisation."""
    return ChannelScores(
        attention=[total.sqrt().float() for total in stats.attention_sum_sq],
        mlp=[total.sqrt().float() for total in stats.mlp_sum_sq],
    )


def _expand_kv(kv_channel_scores: Tensor, group_size: int, head_dim: int) -> Tensor:
    """(num_kv_heads · head_dim,) → (num_heads · head_dim,): each query head gets its KV head's scores."""
    per_kv_head = kv_channel_scores.view(-1, 1, head_dim).expand(-1, group_size, head_dim)
    return per_kv_head.reshape(-1)


def _weight_channel_scores(parts: LayerParts, per_weight: dict[str, Tensor], group_size: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """Attention channel = q row + o column + (k row + v row of its KV head) / group_size; MLP = gate/up rows + down column.

    A KV head is shared by the group_size query heads of its group: each of them carries an equal share of its k/v
    rows, so summing the channel scores over a group (the mean part of its score) counts every K/V weight once,
    not once per query head. With one query head per KV head (the reference's multi-head attention) this is the
    reference's q + k + v + o.
    """
    kv = per_weight["k_proj"].sum(dim=1) + per_weight["v_proj"].sum(dim=1)
    attention = per_weight["q_proj"].sum(dim=1) + per_weight["o_proj"].sum(dim=0) + _expand_kv(kv, group_size, head_dim) / group_size
    mlp = per_weight["gate_proj"].sum(dim=1) + per_weight["up_proj"].sum(dim=1) + per_weight["down_proj"].sum(dim=0)
    return attention, mlp


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor on every process: a sharded DTensor (FSDP2) is all-gathered, a plain tensor returned as is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _layer_by_layer(model: nn.Module, per_weight_of: Callable[[int, LayerParts], dict[str, Tensor]]) -> ChannelScores:
    """Channel scores of every layer from ``per_weight_of(index, parts)``, one layer's weights at a time.

    Under FSDP2 every process gathers one layer's full weights, scores them and drops them before the
    next layer, so no process ever holds the whole model (a 7B model's fp32 weights would not fit).
    """
    widths = model_widths(model)
    attention, mlp = [], []
    for index, parts in enumerate(all_layer_parts(model)):
        layer_attention, layer_mlp = _weight_channel_scores(parts, per_weight_of(index, parts), widths.group_size, widths.head_dim)
        attention.append(layer_attention)
        mlp.append(layer_mlp)
    return ChannelScores(attention, mlp)


def _full_weight(parts: LayerParts, name: str) -> Tensor:
    """(out, in) fp32: the whole weight of linear ``name``, gathered from every process under FSDP2."""
    return full_tensor(getattr(parts, name).weight.detach()).float()


@torch.no_grad()
def taylor_scores(model: nn.Module, grads: GradientStats) -> ChannelScores:
    """First-order Taylor: per weight |Σ_batches ∂L/∂W ⊙ W| (``taylor``), or Σ_batches |∂L/∂W| ⊙ |W| when ``grads``
    summed |∂L/∂W| (``taylor_abs``, the reference's accumulation), summed over each channel's rows/columns.

    ``grads`` must already be summed over processes (``GradientStats.all_reduce``); sharded sums are gathered.
    """
    def per_weight(index: int, parts: LayerParts) -> dict[str, Tensor]:
        layer = grads.grad_sums[index]
        return {name: (full_tensor(total) * _full_weight(parts, name)).abs() for name, total in layer.items()}

    return _layer_by_layer(model, per_weight)


@torch.no_grad()
def magnitude_scores(model: nn.Module) -> ChannelScores:
    """Blind baseline: Σ|W| over each channel's rows/columns (same grouping as taylor); sharded weights are gathered."""
    return _layer_by_layer(model, lambda index, parts: {name: _full_weight(parts, name).abs() for name in PRUNABLE_LINEARS})


def random_scores(model: nn.Module, seed: int) -> ChannelScores:
    """Blind baseline: uniform random channel scores from a seeded generator."""
    # A CPU generator, named as the device: every process and machine draws the same scores.
    generator = torch.Generator(device="cpu").manual_seed(seed)
    parts = all_layer_parts(model)
    return ChannelScores(
        attention=[torch.rand(p.o_proj.in_features, generator=generator, device=generator.device) for p in parts],
        mlp=[torch.rand(p.down_proj.in_features, generator=generator, device=generator.device) for p in parts],
    )


def head_scores(channel_scores: Tensor, head_dim: int) -> Tensor:
    """(num_heads · head_dim,) → (num_heads,): mean + (10 / head_dim) · max over each head's channels."""
    per_head = channel_scores.view(-1, head_dim)
    return per_head.mean(dim=1) + (10.0 / head_dim) * per_head.amax(dim=1)


def group_scores(per_head: Tensor, group_size: int) -> Tensor:
    """(num_heads,) → (num_kv_heads,): a KV group scores the sum of its query heads (heads are grouped contiguously)."""
    return per_head.view(-1, group_size).sum(dim=1)
