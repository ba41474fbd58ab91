"""Adam moments through a head-dim shot, on one device and through the FSDP2 path.

The shot multiplies q (weight and bias) by c = √(d'/d), so the gradient of the new q is g/c. The reference is a
model built directly at the new shape whose AdamW state was accumulated from the recorded gradients of the kept
entries, divided by c for q: one step of the shrunk model with its carried state must equal one step of it.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from tests.test_head_dim import head_dim_plan
from tests.tiny_models import random_batches, tiny_llama
from transact_pl.distributed import carry_over_sharded_state, full_copy, is_sharded, shard_model, shrink_sharded
from transact_pl.head_dim import exact_rope_parameters
from transact_pl.optim_state import carry_over_state
from transact_pl.surgery import ParamSlice, apply_plan

LR, WEIGHT_DECAY, STEPS = 1e-2, 0.1, 3
PAIRS, VALUES = [0, 2], [1, 2, 5, 6]  # head_dim 8 → 4: rotary pairs 0 and 2 (stride 2), four value channels
BATCHES = [batch["input_ids"] for batch in random_batches(num_batches=STEPS + 1)]


def full(tensor: Tensor) -> Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) DTensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def train_recording_gradients(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list[Tensor]]:
    """STEPS AdamW steps; every parameter's full gradient at every step, by name."""
    gradients: dict[str, list[Tensor]] = {name: [] for name, _ in model.named_parameters()}
    for input_ids in BATCHES[:STEPS]:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        for name, parameter in model.named_parameters():
            gradients[name].append(full(parameter.grad).detach().clone())
        optimizer.step()
        optimizer.zero_grad()
    return gradients


def shot_plan(model: nn.Module):
    rope = exact_rope_parameters(model.config.rope_parameters, 8, 4, offset=0, stride=2)
    return head_dim_plan(model, PAIRS, VALUES, rope)


def gradient_factor(name: str) -> float:
    """d(old q)/d(new q) = 1/c for q_proj (weight and bias), 1 elsewhere."""
    return 1 / math.sqrt(4 / 8) if ".q_proj." in name else 1.0


def direct_model(shrunk: nn.Module, gradients: dict[str, list[Tensor]], slices: dict[str, ParamSlice]):
    """A model built at the new shape from the shrunk config and weights, and AdamW state accumulated from the
    kept entries of the recorded gradients in the new parametrisation."""
    model = type(shrunk)(copy.deepcopy(shrunk.config)).train()
    model.load_state_dict(shrunk.state_dict())
    history = optimizer_for(model)
    for step in range(STEPS):
        for name, parameter in model.named_parameters():
            piece = slices.get(name)
            gradient = gradients[name][step]
            if piece is not None:
                gradient = gradient.index_select(piece.dim, piece.kept)
            parameter.grad = gradient * gradient_factor(name)
        saved = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
        history.step()
        with torch.no_grad():  # only the moments are wanted: the weights stay the shrunk ones
            for name, parameter in model.named_parameters():
                parameter.copy_(saved[name])
    optimizer = optimizer_for(model)
    optimizer.load_state_dict(history.state_dict())
    return model, optimizer


def one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    input_ids = BATCHES[STEPS]
    optimizer.zero_grad()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    return {name: full(parameter).detach().clone() for name, parameter in model.named_parameters()}


def assert_same_step(shrunk, shrunk_optimizer, gradients, slices) -> None:
    reference, reference_optimizer = direct_model(full_copy(shrunk) if is_sharded(shrunk) else shrunk,
                                                  gradients, slices)
    q_name = "model.layers.0.self_attn.q_proj.weight"
    carried = shrunk_optimizer.state[dict(shrunk.named_parameters())[q_name]]
    expected = reference_optimizer.state[dict(reference.named_parameters())[q_name]]
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(full(carried[key]), expected[key], rtol=1e-5, atol=1e-12, msg=f"q_proj {key}")
    after, reference_after = one_step(shrunk, shrunk_optimizer), one_step(reference, reference_optimizer)
    for name, value in reference_after.items():
        torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-7, msg=f"{name} after one step")


def test_one_step_after_a_head_dim_shot_equals_a_model_built_at_the_new_shape():
    model = tiny_llama(attention_bias=True).train()
    optimizer = optimizer_for(model)
    gradients = train_recording_gradients(model, optimizer)
    slices = apply_plan(model, shot_plan(model))
    assert {name for name, s in slices.items() if s.scale != 1.0} == {
        f"model.layers.{i}.self_attn.q_proj.{kind}" for i in range(2) for kind in ("weight", "bias")}
    new_optimizer = optimizer_for(model)
    carry_over_state(optimizer, new_optimizer, slices)
    assert_same_step(model, new_optimizer, gradients, slices)


def test_the_sharded_path_rescales_the_moments_of_q_too(mesh):
    model = shard_model(tiny_llama(attention_bias=True).train(), mesh=mesh)
    optimizer = optimizer_for(model)
    gradients = train_recording_gradients(model, optimizer)
    new_model, slices = shrink_sharded(model, shot_plan(model), lambda m: shard_model(m, mesh=mesh))
    new_optimizer = optimizer_for(new_model)
    carry_over_sharded_state(model, optimizer, new_model, new_optimizer, slices)
    assert_same_step(new_model, new_optimizer, gradients, slices)
