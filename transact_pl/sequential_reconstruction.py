"""Sequential least-squares reconstruction: each layer refitted on the inputs of the already pruned model.

The ``"dense"`` variant (``transact_pl.reconstruction``) fits every layer to the unpruned model's activations; in
the pruned model layer i sees inputs already changed by the pruning of layers < i. Here the calibration tokens run
through the model one decoder layer at a time (GPTQ/SparseGPT style):

1. one cheap pass records each batch's embeddings and the keyword arguments the model hands every decoder layer
   (masks, rotary cos/sin, position ids: sliding-window layers get their own mask), with the layers' forwards
   replaced by a recorder (FSDP2's hooks still run, so its lazy initialisation sees the real root);
2. per layer i, on the stored hidden states: G of o_proj's input → refit o_proj; G of down_proj's input with the
   refitted o_proj → refit down_proj; then the pruned, refitted layer maps the states to layer i + 1's inputs.

The pruned layer is emulated on the unpruned one without surgery: the refitted weight with zero columns at the
pruned inputs computes exactly what the sliced layer computes (pruned heads, value channels and MLP channels then
contribute nothing). Head-dim plans additionally zero the q rows of dropped rotary pairs, which is exact when the
plan's RoPE reproduces the kept pairs' frequencies (``add_head_dim(exact=True)``); fitted (approximate) RoPE
cannot be emulated and is refused with a ValueError. The model's weights are restored after each layer.

Cost: a stage that only needs o_proj's (down_proj's) input stops the layer there, so the three stages run
attention 3×, gate/up 2× and down 1× per layer, ≈ 2.1 forward passes for SmolLM2 shapes plus the G GEMMs (under
FSDP2 a layer is never stopped half-way, so 3 passes). Memory: the hidden states of every calibration token
(tokens × hidden, on ``state_device``) and one layer's G (fp64) on the model's device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from transact_pl.arch import LayerParts, all_layer_parts, decoder_layers, eval_mode
from transact_pl.head_dim import within_head_channels
from transact_pl.importance import Batch, ReduceFn
from transact_pl.plan import PruningPlan
from transact_pl.reconstruction import (
    DEFAULT_DAMPING,
    assign_full,
    gram_hook,
    kept_input_channels,
    parameter_names,
    solve_refit,
    warn_if_few_tokens,
)
from transact_pl.scoring import full_tensor
from transact_pl.surgery import check_indices


class _StopLayer(Exception):
    """Raised by a hook to end a decoder layer's forward once the statistic it needed is taken."""


@dataclass
class LayerInputs:
    """hidden[b]: (B, T, hidden) states entering the current layer for calibration batch b (on the state device);
    arguments[b][i]: (positional arguments after the hidden states, keyword arguments) the model passes layer i."""

    hidden: list[Tensor]
    arguments: list[list[tuple[tuple, dict]]]


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches: Iterable[Batch], state_device: torch.device) -> LayerInputs:
    """Record every batch's layer-0 hidden states and each layer's call arguments, skipping the layers' compute."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    inputs = LayerInputs([], [])

    def recorder(index: int) -> Callable:
        def forward(hidden_states: Tensor, *args, **kwargs) -> Tensor:
            if index == 0:
                inputs.hidden.append(hidden_states.detach().to(state_device))
            inputs.arguments[-1].append((args, kwargs))
            return hidden_states

        return forward

    for index, layer in enumerate(layers):
        layer.forward = recorder(index)  # an instance attribute: nn.Module.__call__ (and FSDP2's hooks) still run
    try:
        for batch in batches:
            inputs.arguments.append([])
            model(input_ids=batch["input_ids"].to(device), use_cache=False, logits_to_keep=1)
    finally:
        for layer in layers:
            del layer.forward
    return inputs


def _call_layer(layer: nn.Module, hidden: Tensor, arguments: tuple[tuple, dict]) -> Tensor:
    output = layer(hidden, *arguments[0], **arguments[1])
    return output[0] if isinstance(output, tuple) else output


def _kept_moments(layer: nn.Module, linear: nn.Linear, kept: Tensor, inputs: LayerInputs, index: int,
                  device: torch.device, reduce_fn: ReduceFn | None, on_batch: Callable[[], None] | None) -> Tensor:
    """(n, k) fp64 G[:, K] of ``linear``'s input over every batch, running ``layer`` only as far as ``linear``."""
    kept = kept.to(device)
    gram = torch.zeros(linear.in_features, len(kept), dtype=torch.float64, device=device)
    # Only the kept columns: the plan is known here. Never leave an FSDP2 layer half-run (its weights unsharded).
    accumulate, stop = gram_hook(gram, columns=kept), not isinstance(layer, FSDPModule)

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        accumulate(module, args)
        if stop:
            raise _StopLayer

    handle = linear.register_forward_pre_hook(hook)
    try:
        for hidden, arguments in zip(inputs.hidden, inputs.arguments):
            try:
                _call_layer(layer, hidden.to(device), arguments[index])
            except _StopLayer:
                pass
            if on_batch is not None:
                on_batch()
    finally:
        handle.remove()
    if reduce_fn is not None:
        reduce_fn(gram)
    return gram


@contextmanager
def _temporarily(values: dict[nn.Parameter, Tensor]) -> Iterator[None]:
    """Parameters hold the given full values inside (sharded ones take their shards), their own values after."""
    saved = {parameter: parameter.detach().clone() for parameter in values}
    try:
        for parameter, value in values.items():
            assign_full(parameter, value)
        yield
    finally:
        with torch.no_grad():
            for parameter, original in saved.items():
                parameter.copy_(original)


def _expanded(refit: Tensor, kept: Tensor, width: int) -> Tensor:
    """(out, k) → (out, width): the refit in the kept columns, zeros elsewhere (the sliced layer's exact output)."""
    full = refit.new_zeros(refit.shape[0], width)
    full[:, kept.to(refit.device)] = refit
    return full


def _zeroed_query(parts: LayerParts, plan: PruningPlan, index: int) -> dict[nn.Parameter, Tensor]:
    """Head-dim plans: q weight (and bias) with the rows of dropped rotary pairs zeroed; {} for whole heads."""
    layer, before = plan.layers[index], plan.before
    heads = check_indices(layer.kept_heads, before.num_heads, f"layer {index} kept_heads")
    kv_heads = check_indices(layer.kept_kv_heads, before.num_kv_heads, f"layer {index} kept_kv_heads")
    channels = within_head_channels(layer, heads, kv_heads, before, plan.after, index)
    if channels is None:
        return {}
    values = {}
    for parameter in (parts.q_proj.weight, parts.q_proj.bias):
        if parameter is not None:
            full = full_tensor(parameter.detach())
            keep = torch.zeros(full.shape[0], dtype=torch.bool, device=full.device)
            keep[channels[0].to(full.device)] = True
            values[parameter] = full * keep.view(-1, *([1] * (full.dim() - 1))).to(full.dtype)
    return values


def check_emulatable(model: nn.Module, plan: PruningPlan) -> None:
    """Raise ValueError when the pruned layers of ``plan`` cannot be emulated exactly (head-dim with fitted RoPE)."""
    if plan.after.head_dim == plan.before.head_dim:
        return
    if plan.rope_parameters is None:
        raise ValueError(f"a plan shrinking head_dim {plan.before.head_dim} → {plan.after.head_dim} must carry rope_parameters")
    rotary = model.model.rotary_emb
    config = copy.deepcopy(model.config)
    config.head_dim, config.rope_parameters = plan.after.head_dim, dict(plan.rope_parameters)
    shrunk = type(rotary)(config=config).to(rotary.inv_freq.device)
    for index, layer in enumerate(plan.layers):
        for pairs in layer.kept_qk_pairs or []:
            old = rotary.inv_freq[torch.tensor(pairs, device=rotary.inv_freq.device)]
            if not torch.allclose(shrunk.inv_freq, old, rtol=1e-5) or shrunk.attention_scaling != rotary.attention_scaling:
                raise ValueError(
                    f"sequential reconstruction needs the head-dim plan's RoPE to keep the kept rotary pairs' frequencies "
                    f"exactly (layer {index} keeps pairs {pairs[:6]}... at other frequencies: fitted RoPE); use "
                    "reconstruction 'dense' or exact head-dim pruning")


@torch.no_grad()
def sequential_refit(
    model: nn.Module,
    plan: PruningPlan,
    batches: Iterable[Batch],
    damping: float = DEFAULT_DAMPING,
    reduce_fn: ReduceFn | None = None,
    state_device: torch.device | str | None = None,
    output_device: torch.device | str | None = None,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, Tensor]:
    """{parameter name: refitted post-shot weight} of o_proj and down_proj of every layer, each fitted on the
    inputs of the model whose earlier layers (and, for down_proj, whose own attention) are already pruned and
    refitted. The model ends with the weights and training mode it had.

    batches: this process's calibration share (iterated once); reduce_fn sums each layer's G over processes
    (every rank must run the same number of batches); state_device: where the calibration hidden states wait
    between layers (default the model's device; "cpu" offloads them); on_batch: after every layer-batch run
    (3 × layers × batches calls).
    """
    if damping < 0:
        raise ValueError(f"damping must be ≥ 0, got {damping}")
    check_emulatable(model, plan)
    device = next(model.parameters()).device
    state = torch.device(state_device) if state_device is not None else device
    names, refits = parameter_names(model), {}
    with eval_mode(model):
        inputs = capture_layer_inputs(model, batches, state)
        warn_if_few_tokens(_num_tokens(inputs, device, reduce_fn), plan)
        for index, (layer, parts) in enumerate(zip(decoder_layers(model), all_layer_parts(model))):
            for linear, weight in zip((parts.o_proj, parts.down_proj),
                                      _refit_one_layer(layer, parts, plan, index, inputs, damping, device, reduce_fn, on_batch)):
                refits[names[id(linear.weight)]] = weight.to(output_device) if output_device is not None else weight
    return refits


def _num_tokens(inputs: LayerInputs, device: torch.device, reduce_fn: ReduceFn | None) -> int:
    """Calibration tokens over every process (the count is summed on the model's device)."""
    count = torch.tensor([sum(hidden.shape[0] * hidden.shape[1] for hidden in inputs.hidden)], dtype=torch.float64,
                         device=device)
    if reduce_fn is not None:
        reduce_fn(count)
    return int(count.item())


def _refit_one_layer(layer: nn.Module, parts: LayerParts, plan: PruningPlan, index: int, inputs: LayerInputs,
                     damping: float, device: torch.device, reduce_fn: ReduceFn | None,
                     on_batch: Callable[[], None] | None) -> tuple[Tensor, Tensor]:
    """Refit layer ``index``'s o_proj then down_proj on ``inputs`` and advance ``inputs.hidden`` past the layer."""
    kept_attention, kept_mlp = kept_input_channels(plan, index)
    with _temporarily(_zeroed_query(parts, plan, index)):
        gram = _kept_moments(layer, parts.o_proj, kept_attention, inputs, index, device, reduce_fn, on_batch)
        o_weight = full_tensor(parts.o_proj.weight.detach())
        o_refit = solve_refit(o_weight, gram, kept_attention, damping).to(o_weight.dtype)
        del gram
        with _temporarily({parts.o_proj.weight: _expanded(o_refit, kept_attention, parts.o_proj.in_features)}):
            gram = _kept_moments(layer, parts.down_proj, kept_mlp, inputs, index, device, reduce_fn, on_batch)
            down_weight = full_tensor(parts.down_proj.weight.detach())
            down_refit = solve_refit(down_weight, gram, kept_mlp, damping).to(down_weight.dtype)
            del gram
            expanded_down = _expanded(down_refit, kept_mlp, parts.down_proj.in_features)
            with _temporarily({parts.down_proj.weight: expanded_down}):
                for batch, (hidden, arguments) in enumerate(zip(inputs.hidden, inputs.arguments)):
                    inputs.hidden[batch] = _call_layer(layer, hidden.to(device), arguments[index]).to(hidden.device)
                    if on_batch is not None:
                        on_batch()
    return o_refit, down_refit
