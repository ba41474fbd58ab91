"""Least-squares reconstruction: refit the weights that *read* pruned activations so each layer's output moves little.

After a shot has chosen the kept channels K of the two transitional activations, the linear that reads each one
(``o_proj``: attention context, width heads·head_dim; ``down_proj``: MLP activation, width intermediate_size) is
refitted on the calibration tokens x:

    W' = argmin Σ_x ‖W x − W' x_K‖² = W · G[:, K] · (G[K, K] + λ I)⁻¹,   G = Σ_x x xᵀ,   λ = damping · mean diag G[K, K]

solved in fp64 by Cholesky (pseudo-inverse if that fails). Biases are kept: they do not read the pruned input.
Under whole-head pruning K is the kept heads' channels; under head-dim pruning it is the kept v channels of the kept
heads (``LayerPlan.kept_v_channels``). diag G is exactly ``collect_activation_stats``' Σa² (same kernel), so one
calibration pass gives both the ``acts`` scores and the moments.

Two variants (recorded in ``PruningPlan.reconstruction`` / ``.damping``; names in ``RECONSTRUCTIONS``):
- ``"dense"``: G from the model before the shot (every layer sees the unpruned model's inputs);
  ``collect_second_moments`` then ``refit_weights``.
- ``"sequential"``: layer by layer, G of layer i from the model whose layers < i are already pruned and refitted,
  and inside a layer ``down_proj``'s G after ``o_proj``'s refit (corrects accumulated error);
  ``sequential_refit`` (lives in ``transact_pl.sequential_reconstruction``).

Use in a shot (the model is never mutated until the caller applies the plan)::

    moments = collect_second_moments(model, batches, storage_device="cpu")   # one hooked pass, this rank's share
    moments.all_reduce(sum_over_processes)                                   # DDP/FSDP2: summed on the model's device
    scores = acts_scores(moments.activation_stats())                         # identical to the plain `acts` pass
    plan = replace(plan_shot(model, scores, after, shot, "acts"), reconstruction="dense", damping=DEFAULT_DAMPING)
    refits = refit_weights(model, plan, moments, plan.damping)               # {param name: post-shot weight}
    apply_plan(model, plan)            # or model, _ = shrink_sharded(model, plan, shard) under FSDP2
    load_refit(model, refits)          # same names; DTensor params are re-distributed (a collective: every rank)

Memory: one layer's G is width² fp64: SmolLM2-135M 30 × (1536² + 576²) × 8 B = 646 MB for all layers; LLaMA-7B
one layer (11008² + 4096²) × 8 B = 1.10 GB, all 32 layers 35.3 GB. So on an accelerator either keep the moments
on the CPU (``storage_device="cpu"``: each batch's fp32 partial G is copied over and summed there in fp64;
``all_reduce`` stages one G at a time on the device), or collect groups of layers (``layers=[...]``, one pass per
group) and refit each group before collecting the next (for a 7B model on a GPU the extra passes cost less than
copying 32 × 0.5 GB partial G per batch to the host). The solve holds one layer's G[:, K], G[K, K] and W in fp64 on
the weight's device (≤ 2 × one layer's G). Under FSDP2 the weights are gathered one layer at a time
(``full_tensor``); the moments are replicated on every rank (as the Σa² statistics are). The refitted weights
(post-shot o_proj/down_proj of every layer) stay on the weight's device unless ``output_device`` says otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from transact_pl.arch import LayerParts, all_layer_parts
from transact_pl.head_dim import within_head_channels
from transact_pl.importance import ActivationStats, Batch, ReduceFn, channel_sum_squares, check_finite, hooked_passes
from transact_pl.plan import PruningPlan
from transact_pl.scoring import full_tensor
from transact_pl.surgery import check_indices, head_channels

RECONSTRUCTIONS = ("dense", "sequential")
# λ / mean diag G[K, K]. On SmolLM2 at 6/9 heads + MLP 768 with 128×256 calibration tokens (docs/benchmarks.md,
# "Least-squares reconstruction") held-out perplexity fell from 1e-1 to 1e-4 (1e-4 best by ≤ 3 % over 1e-3, on both
# variants 1e-3 beat 1e-2 by 6-10 %); 1e-3 keeps some margin for smaller calibration sets.
DEFAULT_DAMPING = 1e-3


@dataclass
class SecondMoments:
    """Σ x xᵀ of the o_proj and down_proj inputs of the layers ``layers`` (list positions follow ``layers``).

    attention[j]: (A, A) fp64, A = heads·head_dim; mlp[j]: (I, I) fp64, I = intermediate_size; on ``storage_device``.
    attention_sum_sq[j] (A,), mlp_sum_sq[j] (I,): fp64 Σa² by the ``acts`` kernel, on ``device``.
    device: the model's device, where collectives run (NCCL takes CUDA tensors only).
    """

    layers: list[int]
    attention: list[Tensor]
    mlp: list[Tensor]
    attention_sum_sq: list[Tensor]
    mlp_sum_sq: list[Tensor]
    num_tokens: int
    device: torch.device

    def all_reduce(self, reduce_fn: ReduceFn) -> None:
        """Sum over processes, one tensor at a time on ``device`` (a CPU-stored G visits the device alone)."""
        for tensor in [*self.attention, *self.mlp, *self.attention_sum_sq, *self.mlp_sum_sq]:
            staged = tensor.to(self.device)
            reduce_fn(staged)
            if staged is not tensor:
                tensor.copy_(staged)
        count = torch.tensor([self.num_tokens], dtype=torch.float64, device=self.device)
        reduce_fn(count)
        self.num_tokens = int(count.item())

    def activation_stats(self) -> ActivationStats:
        """The ``acts`` statistics of every layer (moments must cover all layers, in order)."""
        if self.layers != list(range(len(self.layers))):
            raise ValueError(f"activation_stats needs the moments of every layer in order, these cover layers {self.layers}")
        return ActivationStats(self.attention_sum_sq, self.mlp_sum_sq, self.num_tokens)

    def of_layer(self, index: int) -> tuple[Tensor, Tensor]:
        """(G of o_proj's input, G of down_proj's input) of decoder layer ``index``."""
        if index not in self.layers:
            raise ValueError(f"no second moments for layer {index}; these cover layers {self.layers}")
        position = self.layers.index(index)
        return self.attention[position], self.mlp[position]


@contextmanager
def ieee_fp32_matmul():
    """Full-precision fp32 GEMMs inside (TF32 would round G's entries to ~1e-3 relative)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


# Column panels of a full G per batch: only the panels on and right of the diagonal are multiplied (G is symmetric),
# (k + 1) / 2k of the full GEMM's FLOPs for k panels; ``mirror_upper`` completes G once after the last batch.
GRAM_PANELS = 4


def gram_hook(gram: Tensor, sum_sq: Tensor | None = None, columns: Tensor | None = None,
              upper_only: bool = False) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
    """A forward pre-hook adding the input's x xᵀ (fp32 GEMMs per batch) into ``gram`` and Σx² into ``sum_sq``.

    columns: only those columns of x xᵀ (``gram`` is then (n, len(columns))), when the kept channels are known.
    upper_only: (full G only) accumulate the blocks on and above the diagonal of ``GRAM_PANELS`` panels; the caller
    runs ``mirror_upper(gram)`` after the last batch.
    """
    def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        activation = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
        if sum_sq is not None:
            sum_sq.add_(channel_sum_squares(activation).to(sum_sq.dtype))
        as_fp32 = activation.float()
        with ieee_fp32_matmul():
            if columns is not None or not upper_only:
                _add_into(gram, as_fp32.T @ (as_fp32 if columns is None else as_fp32.index_select(1, columns)))
                return
            width = as_fp32.shape[1]
            panel = -(-width // GRAM_PANELS)
            for start in range(0, width, panel):
                _add_into(gram[start : start + panel, start:], as_fp32[:, start : start + panel].T @ as_fp32[:, start:])

    return hook


def _add_into(accumulator: Tensor, partial: Tensor) -> None:
    """accumulator (fp64) += partial (fp32), converting element by element (no fp64 copy) when on one device."""
    accumulator.add_(partial if partial.device == accumulator.device else partial.to(accumulator.device))


def mirror_upper(gram: Tensor) -> None:
    """Make a square G whose upper triangle (diagonal included) holds Σ x xᵀ whole: lower = upperᵀ, in place."""
    strictly_upper = gram.triu(1)
    gram.triu_().add_(strictly_upper.T)


@torch.no_grad()
def collect_second_moments(
    model: nn.Module,
    batches: Iterable[Batch],
    layers: Sequence[int] | None = None,
    storage_device: torch.device | str | None = None,
    on_batch: Callable[[], None] | None = None,
) -> SecondMoments:
    """One hooked calibration pass (eval mode, weights untouched) accumulating G of o_proj's and down_proj's input.

    layers: decoder layers to collect (default all); storage_device: where the fp64 G live (default the model's
    device; "cpu" keeps them off the accelerator).
    """
    parts = all_layer_parts(model)
    device = next(model.parameters()).device
    storage = torch.device(storage_device) if storage_device is not None else device
    chosen = list(range(len(parts))) if layers is None else sorted(set(layers))
    moments = SecondMoments(
        layers=chosen,
        attention=[_zeros_square(parts[i].o_proj.in_features, storage) for i in chosen],
        mlp=[_zeros_square(parts[i].down_proj.in_features, storage) for i in chosen],
        attention_sum_sq=[torch.zeros(parts[i].o_proj.in_features, dtype=torch.float64, device=device) for i in chosen],
        mlp_sum_sq=[torch.zeros(parts[i].down_proj.in_features, dtype=torch.float64, device=device) for i in chosen],
        num_tokens=0,
        device=device,
    )
    handles = []
    for position, index in enumerate(chosen):
        handles.append(parts[index].o_proj.register_forward_pre_hook(
            gram_hook(moments.attention[position], moments.attention_sum_sq[position], upper_only=True)))
        handles.append(parts[index].down_proj.register_forward_pre_hook(
            gram_hook(moments.mlp[position], moments.mlp_sum_sq[position], upper_only=True)))
    moments.num_tokens = hooked_passes(model, handles, batches, on_batch)
    for gram in [*moments.attention, *moments.mlp]:
        mirror_upper(gram)
    check_finite(moments.attention, moments.mlp, "second moments")
    return moments


def _zeros_square(width: int, device: torch.device) -> Tensor:
    return torch.zeros(width, width, dtype=torch.float64, device=device)


# ----- the solve -----------------------------------------------------------------------------------------------------
def solve_refit(weight: Tensor, kept_columns: Tensor, kept: Tensor, damping: float) -> Tensor:
    """(out, n) W, (n, k) G[:, K], (k,) kept K → (out, k) fp64 W · G[:, K] · (G[K, K] + λ I)⁻¹ on W's device.

    λ = damping · mean diag G[K, K]; Cholesky, or the pseudo-inverse when G[K, K] + λ I is not positive definite
    (e.g. kept channels that never fired and damping 0).
    """
    device = weight.device
    cross_moments = kept_columns.to(device=device, dtype=torch.float64)  # (n, k)
    system = cross_moments.index_select(0, kept.to(device)).clone()  # (k, k)
    system.diagonal().add_(damping * system.diagonal().mean())
    target = weight.to(torch.float64) @ cross_moments  # (out, k)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(target.T, factor).T
    warnings.warn(f"G[K, K] + λI is not positive definite (damping {damping}); refitting with its pseudo-inverse")
    return target @ torch.linalg.pinv(system, hermitian=True)


# Fewer calibration tokens than this many per kept input channel make the refit fit noise: on SmolLM2 at MLP 768,
# 2,048 tokens (2.7 per channel) raised held-out perplexity 1.5-1.7×, 8,192 (10.7 per channel) lowered it 0.75×.
MIN_TOKENS_PER_KEPT_CHANNEL = 4


def warn_if_few_tokens(num_tokens: int, plan: PruningPlan) -> None:
    """Warn when the calibration tokens are too few for the widest refit of ``plan`` (see the constant above)."""
    widest = max(plan.after.intermediate_size, plan.after.num_heads * plan.after.head_dim)
    if num_tokens < MIN_TOKENS_PER_KEPT_CHANNEL * widest:
        warnings.warn(f"least-squares reconstruction from {num_tokens} calibration tokens for {widest} kept input "
                      f"channels overfits (measured: it can raise perplexity); give at least "
                      f"{MIN_TOKENS_PER_KEPT_CHANNEL * widest} tokens, ideally 10× the kept width, or turn it off")


def kept_input_channels(plan: PruningPlan, index: int) -> tuple[Tensor, Tensor]:
    """(o_proj columns, down_proj columns) that layer ``index`` keeps, in post-shot order (ascending)."""
    layer, before = plan.layers[index], plan.before
    heads = check_indices(layer.kept_heads, before.num_heads, f"layer {index} kept_heads")
    kv_heads = check_indices(layer.kept_kv_heads, before.num_kv_heads, f"layer {index} kept_kv_heads")
    mlp = check_indices(layer.kept_mlp_channels, before.intermediate_size, f"layer {index} kept_mlp_channels")
    channels = within_head_channels(layer, heads, kv_heads, before, plan.after, index)
    attention = head_channels(heads, before.head_dim) if channels is None else channels[3]
    return attention, mlp


def parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) → its name in ``model.named_parameters()``."""
    return {id(parameter): name for name, parameter in model.named_parameters()}


def refit_layer(parts: LayerParts, plan: PruningPlan, index: int, grams: tuple[Tensor, Tensor],
                damping: float) -> tuple[Tensor, Tensor]:
    """(o_proj weight (hidden, A'), down_proj weight (hidden, I')) refitted for layer ``index``, in the weights'
    dtype on their device; sharded (FSDP2) weights are gathered for the solve."""
    refitted = []
    for linear, gram, kept in zip((parts.o_proj, parts.down_proj), grams, kept_input_channels(plan, index)):
        weight = full_tensor(linear.weight.detach())
        kept_columns = gram.index_select(1, kept.to(gram.device))
        refitted.append(solve_refit(weight, kept_columns, kept, damping).to(weight.dtype))
    return refitted[0], refitted[1]


@torch.no_grad()
def refit_weights(model: nn.Module, plan: PruningPlan, moments: SecondMoments, damping: float = DEFAULT_DAMPING,
                  output_device: torch.device | str | None = None) -> dict[str, Tensor]:
    """{parameter name: refitted weight with the post-shot shape} for o_proj and down_proj of every layer in
    ``moments``; the model is not changed. output_device: where the results live (default: the weight's device)."""
    if damping < 0:
        raise ValueError(f"damping must be ≥ 0, got {damping}")
    warn_if_few_tokens(moments.num_tokens, plan)
    names = parameter_names(model)
    parts = all_layer_parts(model)
    refits = {}
    for index in moments.layers:
        new_weights = refit_layer(parts[index], plan, index, moments.of_layer(index), damping)
        for linear, weight in zip((parts[index].o_proj, parts[index].down_proj), new_weights):
            refits[names[id(linear.weight)]] = weight.to(output_device) if output_device is not None else weight
    return refits


@torch.no_grad()
def assign_full(parameter: Tensor, value: Tensor) -> None:
    """parameter ← value (the whole tensor); a DTensor parameter takes its shards of ``value`` (a collective)."""
    if isinstance(parameter, DTensor):
        local = parameter.to_local()
        value = distribute_tensor(value.to(device=local.device, dtype=local.dtype), parameter.device_mesh,
                                  parameter.placements)
    parameter.copy_(value)


def load_refit(model: nn.Module, refits: dict[str, Tensor]) -> None:
    """Copy ``refit_weights``' results into the pruned ``model`` (after ``apply_plan``/``shrink_sharded``).

    Under FSDP2 every rank must call this with the same names in the same order (the shards are scattered).
    """
    parameters = dict(model.named_parameters())
    problems = [f"{name}: no such parameter" for name in refits if name not in parameters]
    problems += [f"{name}: the model has shape {tuple(parameters[name].shape)}, the refit {tuple(value.shape)} "
                 "(apply the plan first)" for name, value in refits.items()
                 if name in parameters and parameters[name].shape != value.shape]
    if problems:
        raise ValueError("cannot load the refitted weights: " + "; ".join(problems))
    for name, value in refits.items():
        assign_full(parameters[name], value)
