"""The pruning plan: which heads, KV groups and MLP channels each layer keeps, as plain data.

A plan is computed from scores (``make_plan``), applied by ``surgery.apply_plan``, stored as
JSON in checkpoints and exports, and can be replayed on a fresh copy of the base model.
Indices refer to the model *as it was before that shot* and are ascending.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from transact_pl.arch import Widths
from transact_pl.scoring import ChannelScores, group_scores, head_scores

# The key under which every checkpoint carries its base model, layer count and plans (see TransActLM).
CHECKPOINT_KEY = "transact"


@dataclass
class LayerPlan:
    """Kept query heads, KV heads and MLP channels of one layer (ascending, pre-shot indices).

    Head-dim pruning (``transact_pl.head_dim``) also keeps, per kept KV head (in kept_kv_heads order), rotary
    pairs j < head_dim/2 of its q/k heads (channels j and j + head_dim/2) and value channels of v/o; None keeps
    whole heads.
    """

    kept_heads: list[int]
    kept_kv_heads: list[int]
    kept_mlp_channels: list[int]
    kept_qk_pairs: list[list[int]] | None = None
    kept_v_channels: list[list[int]] | None = None


@dataclass
class PruningPlan:
    """One shot: widths before and after, the scorer that chose, and the per-layer kept indices."""

    shot: int
    scorer: str
    before: Widths
    after: Widths
    layers: list[LayerPlan]
    rope_parameters: dict | None = None  # the model's rope_parameters after a head-dim shot (None: unchanged)
    # Least-squares refit of o_proj/down_proj after slicing (transact_pl.reconstruction): "dense" or "sequential"
    # with its damping; None: weights only sliced.
    reconstruction: str | None = None
    damping: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        return cls(
            shot=data["shot"],
            scorer=data["scorer"],
            before=Widths(**data["before"]),
            after=Widths(**data["after"]),
            layers=[LayerPlan(**layer) for layer in data["layers"]],
            rope_parameters=data.get("rope_parameters"),  # absent from plans written before head-dim pruning
            reconstruction=data.get("reconstruction"),  # absent from plans written before reconstruction
            damping=data.get("damping"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        return cls.from_dict(json.loads(text))


def top_indices(scores: Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, ascending; ties go to the lower index (stable sort)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return sorted(order[:keep].tolist())


def make_plan(scores: ChannelScores, before: Widths, after: Widths, shot: int, scorer: str) -> PruningPlan:
    """Keep, per layer, the top ``after.num_kv_heads`` KV groups and top ``after.intermediate_size`` channels."""
    group_size = before.group_size
    layers = []
    for attention, mlp in zip(scores.attention, scores.mlp):
        kept_groups = top_indices(group_scores(head_scores(attention, before.head_dim), group_size), after.num_kv_heads)
        kept_heads = [group * group_size + offset for group in kept_groups for offset in range(group_size)]
        layers.append(LayerPlan(kept_heads, kept_groups, top_indices(mlp, after.intermediate_size)))
    return PruningPlan(shot=shot, scorer=scorer, before=before, after=after, layers=layers)
