"""Pruning across processes: summed statistics, FSDP2 sharding, and shrinking a sharded model.

Pure torch.distributed (no Lightning). Under FSDP2 every decoder layer and the root are
``fully_shard``-ed; a shrink gathers the full weights, rebuilds an unsharded model, applies the
same surgery as on one device and shards it again. Optimizer state moves through full,
name-keyed state dicts so that the kept rows/columns keep their moments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.optim import Optimizer

from transact_pl.arch import decoder_layers
from transact_pl.optim_state import carried_state_tensor
from transact_pl.plan import PruningPlan
from transact_pl.surgery import ParamSlice, apply_plan

FULL = StateDictOptions(full_state_dict=True)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_processes(tensor: Tensor) -> None:
    """In-place sum over every process (the identity on one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def rank_share(batches: Iterable, rank: int, world_size: int) -> Iterator:
    """Batches rank, rank + W, rank + 2W, ...: each process runs its share of a sequence."""
    return islice(batches, rank, None, world_size)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, mesh=None, **fsdp_kwargs) -> nn.Module:
    """FSDP2: shard every decoder layer, then the root (embeddings, final norm, tied LM head)."""
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model


def full_copy(model: nn.Module) -> nn.Module:
    """An unsharded copy of a sharded model with every weight gathered (on every rank)."""
    state = get_model_state_dict(model, options=FULL)
    device = next(iter(state.values())).device
    unsharded_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        copy = unsharded_class(model.config)
    copy.to_empty(device=device)
    copy.load_state_dict(state)
    for name, buffer in model.named_buffers():  # non-persistent buffers (RoPE inv_freq) are not in the state
        owner_name, _, attribute = name.rpartition(".")
        copy.get_submodule(owner_name).register_buffer(attribute, buffer.detach().clone(), persistent=False)
    copy.tie_weights()
    return copy.train(model.training)


def shrink_sharded(model: nn.Module, plan: PruningPlan, shard: Callable[[nn.Module], nn.Module]) -> tuple[nn.Module, dict[str, ParamSlice]]:
    """Gather, slice as ``plan`` says, re-shard; returns the new model and the slices by parameter name."""
    unsharded = full_copy(model)
    slices = apply_plan(unsharded, plan)
    return shard(unsharded), slices


def carry_over_sharded_state(
    old_model: nn.Module, old: Optimizer, new_model: nn.Module, new: Optimizer, slices: dict[str, ParamSlice]
) -> None:
    """Optimizer state of the kept rows/columns, through full name-keyed optimizer state dicts.

    An optimizer that has not stepped yet has nothing to carry; it is left alone, because the
    torch.distributed.checkpoint state-dict functions would first initialise its state with a
    zero-gradient step, which sets Adam's step count to 1 and skews the first real update.
    """
    if not old.state:
        return
    state = get_optimizer_state_dict(old_model, old, options=FULL)
    for name, per_param in state["state"].items():
        piece = slices.get(name)
        if piece is None:
            continue
        for key, value in per_param.items():
            if isinstance(value, Tensor) and value.dim() > 0:  # kept indices, rescaled with the parameter
                per_param[key] = carried_state_tensor(key, value, piece)
    set_optimizer_state_dict(new_model, new, state, options=FULL)
